"""Data-quality, exactness and staleness checks.

- `slice_data_holds_no_deleted_id`: erasure reached every slice file and trunk cache;
- `exactness_audit` (blocking): no checkpoint of the served plan was trained on a deleted example;
- `stage_k_is_current`, one per stage asset: no partition awaits retraining. After a deletion it fails at ERROR
  severity and lists the stale (shard, sequence) partitions in its description and metadata: Dagster's graph
  does not show the staleness of partitioned assets (dagster-io/dagster#22553), but it turns a card red for a
  failed ERROR check, so the stages a deletion staled are visible where users look. Every run that
  materializes stage partitions is followed by its evaluation (its automation condition), and so does the
  `serve` run the deletion sensor starts, so it passes again once they have retrained.
"""

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


@dg.asset_check(asset="slice_data", description="No slice file or trunk cache holds a deleted example.")
def slice_data_holds_no_deleted_id(s3t: S3TResource) -> dg.AssetCheckResult:
    from s3t_ops.erasure import traces

    engine = s3t.engine(load_backbone=False, repair=False)
    found = traces(engine.state)
    return dg.AssetCheckResult(passed=not found, metadata={"deleted_examples": len(engine.ledger.deleted()),
                                                           "files_holding_deleted_rows": dg.MetadataValue.json(found)})


@dg.asset_check(asset="s3t_ensemble", blocking=True,
                description="Exactness audit: no checkpoint of the served plan was trained on a deleted example.")
def exactness_audit(s3t: S3TResource) -> dg.AssetCheckResult:
    engine = s3t.engine(load_backbone=False, repair=False)
    bad = engine.audit()
    return dg.AssetCheckResult(
        passed=not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"violating_checkpoints": len(bad), "deleted_tombstones_in_lineage": sorted({i for v in bad.values() for i in v})[:20],
                  "deleted_examples": len(engine.ledger.deleted())},
    )


def build_stage_checks(L: int) -> list[dg.AssetChecksDefinition]:
    def make(k: int) -> dg.AssetChecksDefinition:
        # evaluated again after every materialization of the stage, whatever launched it (a backfill, the nightly
        # schedule's runs, automation): the automation sensor runs it (`any_deps_updated`), so a retrained stage's
        # check passes again; the `serve` run after a forget evaluates it too (nothing is materialized then)
        @dg.asset_check(asset=f"stage_{k}", name=f"stage_{k}_is_current", automation_condition=dg.AutomationCondition.any_deps_updated(),
                        description=f"No partition of stage_{k} awaits retraining (a deletion in one of its slices stales it; "
                                    "failed = the partitions listed serve no more until they retrain).")
        def _check(s3t: S3TResource) -> dg.AssetCheckResult:
            stale = s3t.engine(load_backbone=False, repair=False).stale_partitions()[k]
            keys = sorted(str(S3TPartitions.stage_partition(s, q)) for s, q in stale)
            return dg.AssetCheckResult(passed=not stale, severity=dg.AssetCheckSeverity.ERROR,
                                       description=("every partition is current" if not stale else
                                                    f"{len(stale)} partition(s) await retraining: {', '.join(keys)}"),
                                       metadata={"stale_partitions": dg.MetadataValue.json(keys), "n_stale": len(stale)})

        return _check

    return [make(k) for k in range(1, L + 1)]

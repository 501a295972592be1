"""Data-quality and exactness checks; the audit blocks a plan that serves a checkpoint which saw a deleted id."""

import dagster as dg

from pipelines.resources import S3TResource


@dg.asset_check(asset="slice_data", description="No slice file or trunk cache holds a deleted example.")
def slice_data_holds_no_deleted_id(s3t: S3TResource) -> dg.AssetCheckResult:
    from s3t_ops.erasure import traces

    engine = s3t.engine(load_backbone=False, repair=False)
    found = traces(engine)
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

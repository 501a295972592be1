"""Scheduled retraining: at the cron tick, every (shard, sequence) with stale stages retrains stages k..L in one run."""

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def stale_stage_requests(engine, stage_keys: list[dg.AssetKey], tag: str) -> list[dg.RunRequest]:
    """The ledger decides validity: one run per (shard, seq) holding its missing stages."""
    first: dict[tuple[int, int], int] = {}
    for spec in engine.missing_stages():
        cur = first.get((spec.shard, spec.seq), spec.stage)
        first[(spec.shard, spec.seq)] = min(cur, spec.stage)
    return [dg.RunRequest(run_key=f"{tag}-s{s}-q{q}", asset_selection=stage_keys[k - 1:],
                          partition_key=S3TPartitions.stage_partition(s, q), tags={"s3t/retrain": tag})
            for (s, q), k in sorted(first.items())]


def build_retrain_schedule(stages: list[dg.AssetsDefinition], cron: str) -> dg.ScheduleDefinition:
    keys = [a.key for a in stages]

    @dg.schedule(name="retrain_stale_stages", cron_schedule=cron, target=stages,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Retrain the stages that deletions made stale (the policy when S3T_RETRAIN=nightly).")
    def retrain_stale_stages(context: dg.ScheduleEvaluationContext, s3t: S3TResource):
        if not s3t.exists():
            return dg.SkipReason("no ledger yet")
        engine = s3t.engine(load_backbone=False, repair=False)
        if engine.served() is None:
            return dg.SkipReason("not trained yet: the first training is a materialization, not a retraining")
        busy = context.instance.get_run_records(dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                      dg.DagsterRunStatus.STARTED]), limit=500)
        if any(set(r.dagster_run.asset_selection or ()) & set(keys) for r in busy):
            return dg.SkipReason("stages are training in a run already; the next tick retrains what is still stale")
        requests = stale_stage_requests(engine, keys, context.scheduled_execution_time.isoformat())
        return requests or dg.SkipReason("every stage is fresh")

    return retrain_stale_stages

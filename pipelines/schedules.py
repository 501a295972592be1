"""Scheduled retraining: at the cron tick, every stale (shard, sequence) the retraining policy picks (all of them by
default, or per shard the cheapest, within an optional example-step budget) retrains its stages k..L in one run."""

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def stale_stage_requests(engine, stage_keys: list[dg.AssetKey], tag: str, policy: str = "all",
                         budget: int | None = None) -> tuple[list[dg.RunRequest], int]:
    """The ledger decides validity and the engine's policy decides what retrains now (the call `s3t train` makes):
    one run per chosen (shard, seq) holding its stages from the first stale one; and how many stale chains wait."""
    picked, deferred = engine.chains_to_retrain(policy, budget)
    return [dg.RunRequest(run_key=f"{tag}-s{s}-q{q}", asset_selection=stage_keys[k - 1:],
                          partition_key=S3TPartitions.stage_partition(s, q), tags={"s3t/retrain": tag})
            for s, q, k in picked], deferred


def build_retrain_schedule(stages: list[dg.AssetsDefinition], cron: str, policy: str = "all",
                           budget: int | None = None) -> dg.ScheduleDefinition:
    keys = [a.key for a in stages]
    cap = "no budget" if budget is None else f"at most {budget} example-steps per tick"

    @dg.schedule(name="retrain_stale_stages", cron_schedule=cron, target=stages,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Retrain the stages that deletions made stale (the policy when S3T_RETRAIN=nightly): "
                             f"chains: {policy} (S3T_RETRAIN_CHAINS), {cap} (S3T_RETRAIN_BUDGET).")
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
        requests, deferred = stale_stage_requests(engine, keys, context.scheduled_execution_time.isoformat(), policy,
                                                  budget)
        if not requests:
            return dg.SkipReason(f"{deferred} stale chain(s), none within {cap}" if deferred else "every stage is fresh")
        if deferred:
            context.log.info(f"{deferred} stale chain(s) wait for a later tick (chains: {policy}, {cap})")
        return requests

    return retrain_stale_stages

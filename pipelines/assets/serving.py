"""s3t_ensemble: the serving plan (longest valid prefix per shard) registered in MLflow with alias champion."""

import time

import dagster as dg

from pipelines.resources import MlflowResource, S3TResource
from s3t_ops.registry import plan_digest


def build_serving_asset(L: int) -> dg.AssetsDefinition:
    @dg.asset(deps=[f"stage_{k}" for k in range(1, L + 1)], group_name="serving", pool="s3t_ledger",
              automation_condition=dg.AutomationCondition.eager(),
              description="Serving plan over valid stage checkpoints; a new MLflow model version (alias champion) when it changes.")
    def s3t_ensemble(context: dg.AssetExecutionContext, s3t: S3TResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        engine = s3t.engine()
        plan_id, plan = engine.serve()
        record = engine.served()[1]
        t1 = time.perf_counter()
        tracker = mlflow.tracker(s3t.state_dir)
        champion = tracker.champion()
        if champion is not None and champion["plan_digest"] == plan_digest(record):
            version, changed = champion["version"], False
        else:
            version = tracker.register_plan(engine, plan_id, record, tags={"dagster_run_id": context.run_id})
            changed = True
            purged = tracker.purge_superseded(engine)
            if purged:
                context.log.info(f"purged registry versions whose lineage holds deleted examples: {purged}")
        depths = {str(c.shard): c.depth for c in plan.choices}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(str(version)),
            metadata={"plan_id": plan_id, "model_version": str(version), "new_version": changed,
                      "live_shards": len(plan.choices), "dead_shards": dg.MetadataValue.json(list(plan.dead_shards)),
                      "depths": dg.MetadataValue.json(depths),
                      "mean_depth": sum(depths.values()) / max(1, engine.cfg.shards),
                      "deletions_honoured": len(engine.ledger.deletions()),
                      "engine_seconds": t1 - t0, "mlflow_seconds": time.perf_counter() - t1},
        )

    return s3t_ensemble

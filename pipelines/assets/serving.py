"""s3t_ensemble: the serving plan (longest valid prefix per shard), registered in MLflow with alias champion."""

import time

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def _depth_table(m: int, plan, L: int) -> str:
    served = {c.shard: c for c in plan.choices}
    lines = ["| shard | sequence | depth |", "|---|---|---|"]
    for s in range(m):
        c = served.get(s)
        lines.append(f"| {s} | {'-' if c is None else c.seq} | {'dead' if c is None else f'{c.depth} / {L}'} |")
    return "\n".join(lines)


def build_serving_asset(L: int) -> dg.AssetsDefinition:
    @dg.asset(deps=[f"stage_{k}" for k in range(1, L + 1)], group_name="serving",
              automation_condition=dg.AutomationCondition.eager(),
              description="Serving plan: per shard, the longest stage prefix whose checkpoints never saw a deleted example "
                          "(metadata `served`: the depth each shard serves); a new MLflow model version (alias champion) "
                          "when it changes. A forget moves it in its own run; this asset records it and its checks. Serving "
                          "follows the plan without this asset: `s3t serve --state $S3T_STATE` reads the plan pointer a "
                          "forget replaces inside its honour, per request; a model loaded once from the registry does not.")
    def s3t_ensemble(context: dg.AssetExecutionContext, s3t: S3TResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        engine = s3t.engine(load_backbone=False, run_id=context.run_id)
        plan_id, plan = engine.serve()
        version = engine.ledger.publication(plan_id)[1]
        depths = {str(c.shard): c.depth for c in plan.choices}
        served = {c.shard: c for c in plan.choices}
        summary = "; ".join(f"shard {sh}: " + (f"depth {served[sh].depth}/{engine.cfg.slices} (sequence {served[sh].seq})"
                                               if sh in served else "dead") for sh in range(engine.cfg.shards))
        stale = {f"stage_{k}": sorted(str(S3TPartitions.stage_partition(s, q)) for s, q in parts)
                 for k, parts in engine.stale_partitions().items() if parts}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(str(version if version is not None else f"plan-{plan_id}")),
            metadata={"served": summary, "plan_id": plan_id, "model_version": str(version), "live_shards": len(plan.choices),
                      "dead_shards": dg.MetadataValue.json(list(plan.dead_shards)), "depths": dg.MetadataValue.json(depths),
                      "mean_depth": sum(depths.values()) / max(1, engine.cfg.shards),
                      "deletions_honoured": len(engine.ledger.deletions()),
                      "served_depth_per_shard": dg.MetadataValue.md(_depth_table(engine.cfg.shards, plan, engine.cfg.slices)),
                      "stale_stage_partitions": dg.MetadataValue.json(stale),
                      "stages_awaiting_retraining": len(engine.missing_stages()),
                      "engine_seconds": time.perf_counter() - t0,
                      "serving": ("`s3t serve` answers with this plan from the moment the forget that made it returned "
                                  "(it reads the ledger's plan pointer per request); a pyfunc loaded from the registry's "
                                  "champion keeps the version it loaded."),},
        )

    return s3t_ensemble

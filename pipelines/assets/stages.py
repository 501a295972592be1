"""stage_1 .. stage_L, each partitioned by shard x sequence; a materialization trains only missing checkpoints
(the engine records each in a short transaction and logs its MLflow run).

A backfill ("Materialize all") runs every partition of a stage in ONE step (single-run backfill policy):
torch and the backbone load once per stage instead of once per partition.
"""

import time

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def build_stage_assets(parts: S3TPartitions, automation: dg.AutomationCondition | None,
                       op_tags: dict | None = None) -> list[dg.AssetsDefinition]:
    """`op_tags` go on every stage step (e.g. `dagster-k8s/config` resource requests, docs/scaling.md)."""
    return [_stage_asset(parts, k, automation, op_tags) for k in range(1, parts.L + 1)]


def _stage_asset(parts: S3TPartitions, k: int, automation: dg.AutomationCondition | None,
                 op_tags: dict | None = None) -> dg.AssetsDefinition:
    deps = [dg.AssetDep("slice_data", partition_mapping=parts.slice_mapping(k))]
    if k > 1:
        deps.append(dg.AssetDep(f"stage_{k - 1}"))
    slices = "slice" if k == 1 else f"{k} slices"

    @dg.asset(name=f"stage_{k}", partitions_def=parts.stage_def, deps=deps, group_name="stages",
              automation_condition=automation, backfill_policy=dg.BackfillPolicy.single_run(), op_tags=op_tags,
              description=f"Stage {k}: LoRA of group {k} from the top + head, trained on the first {slices} of the sequence. "
                          "A partition is stale when a deletion hit one of those slices.")
    def _stage(context: dg.AssetExecutionContext, s3t: S3TResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        engine = s3t.engine(run_id=context.run_id)
        done, trained, steps, seconds = {}, 0, 0, 0.0
        for key in context.partition_keys:
            p = S3TPartitions.parse(key)
            engine.tags["dagster_partition"] = str(key)
            row, reused = engine.materialize_stage(p["shard"], p["seq"], k)
            done[str(key)] = {"checkpoint_key": row["key"], "reused": reused, "prefix": row["prefix"],
                              "val_accuracy": None if row["val_acc"] is None else round(float(row["val_acc"]), 4)}
            if not reused:
                trained += 1
                steps += int(row["grad_example_steps"])
                seconds += float(row["seconds"])
        return dg.MaterializeResult(metadata={
            "partitions": dg.MetadataValue.json(done), "trained": trained, "reused": len(done) - trained,
            "grad_example_steps": steps, "train_seconds": seconds, "engine_seconds": time.perf_counter() - t0})

    return _stage

"""stage_1 .. stage_L, each partitioned by shard x sequence; a materialization trains only a missing checkpoint
(the engine records it in a short transaction and logs its MLflow run)."""

import time

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def build_stage_assets(parts: S3TPartitions, automation: dg.AutomationCondition | None) -> list[dg.AssetsDefinition]:
    return [_stage_asset(parts, k, automation) for k in range(1, parts.L + 1)]


def _stage_asset(parts: S3TPartitions, k: int, automation: dg.AutomationCondition | None) -> dg.AssetsDefinition:
    deps = [dg.AssetDep("slice_data", partition_mapping=parts.slice_mapping(k))]
    if k > 1:
        deps.append(dg.AssetDep(f"stage_{k - 1}"))

    @dg.asset(name=f"stage_{k}", partitions_def=parts.stage_def, deps=deps, group_name="stages",
              automation_condition=automation,
              description=f"Stage {k}: LoRA of group {k} from the top + head, trained on the first {k} slices of the sequence. "
                          "Data version = the checkpoint's content key.")
    def _stage(context: dg.AssetExecutionContext, s3t: S3TResource) -> dg.MaterializeResult:
        p = S3TPartitions.parse(context.partition_key)
        t0 = time.perf_counter()
        engine = s3t.engine(run_id=context.run_id)
        engine.tags["dagster_partition"] = str(context.partition_key)
        row, reused = engine.materialize_stage(p["shard"], p["seq"], k)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(row["key"]),
            metadata={"checkpoint_key": row["key"], "reused": reused, "prefix": row["prefix"],
                      "n_train": int(row["n_train"]), "val_accuracy": float(row["val_acc"] or 0.0),
                      "grad_example_steps": 0 if reused else int(row["grad_example_steps"]),
                      "train_seconds": 0.0 if reused else float(row["seconds"]),
                      "engine_seconds": time.perf_counter() - t0},
        )

    return _stage

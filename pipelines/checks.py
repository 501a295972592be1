"""Data-quality and exactness checks; the audit blocks a plan that serves a checkpoint which saw a deleted id."""

from pathlib import Path

import dagster as dg
import pandas as pd

from pipelines.resources import S3TResource


@dg.asset_check(asset="slice_data", description="No slice file or trunk cache holds a deleted example id.")
def slice_data_holds_no_deleted_id(s3t: S3TResource) -> dg.AssetCheckResult:
    engine = s3t.engine(load_backbone=False)
    deleted = engine.ledger.deleted_ids()
    found: set[str] = set()
    for path in sorted((Path(s3t.state_dir) / "slices").glob("*.parquet")):
        found |= deleted & set(pd.read_parquet(path, columns=["id"])["id"])
    for path in sorted((Path(s3t.state_dir) / "trunk").glob("*.safetensors")):
        found |= deleted & set(engine.trunk(path.name).ids)
    return dg.AssetCheckResult(passed=not found, metadata={"deleted_ids": len(deleted), "violations": sorted(found)[:20]})


@dg.asset_check(asset="s3t_ensemble", blocking=True,
                description="Exactness audit: no checkpoint of the served plan was trained on a deleted example.")
def exactness_audit(s3t: S3TResource) -> dg.AssetCheckResult:
    engine = s3t.engine(load_backbone=False)
    bad = engine.audit()
    return dg.AssetCheckResult(
        passed=not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"violating_checkpoints": len(bad), "deleted_ids_in_lineage": sorted({i for v in bad.values() for i in v})[:20],
                  "deleted_ids": len(engine.ledger.deleted_ids())},
    )

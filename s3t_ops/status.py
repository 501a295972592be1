"""What `s3t status` reports of a state: its data, deletions, served plan, registry and stale stages."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from s3t_ops.engine import S3T


def status(engine: "S3T", example_id: str | None = None) -> dict:
    """Data, deletions (honoured / erased / retrained), served plan, registry, stale stages, what the opening repaired."""
    served = engine.served()
    dels = engine.ledger.deletions()
    counts = engine.examples().groupby("split").size().to_dict()
    missing = engine.missing_stages()
    out = {
        "config": engine.cfg.to_dict(), "examples": {k: int(v) for k, v in counts.items()},
        "sequences": [list(p) for p in engine.sequences],
        "deletions": {"total": len(dels), "honoured": int(dels["honoured_at"].notna().sum()),
                      "erased": int(dels["erased_at"].notna().sum()), "retrained": int(dels["retrained_at"].notna().sum())},
        "served_plan": None if served is None else {"plan_id": served[0], **served[1]["plan"]},
        "registry": {"version": engine.ledger.publication(served[0])[1] if served else None,
                     "published": bool(served and engine.ledger.publication(served[0])[0] is not None),
                     "pending_erasure": len(engine.ledger.pending_erasure("registry")),
                     "error": engine.last_repair.registry_error,
                     **{k: v for k, v in engine.publisher.describe().items()}},
        "stages": {"total": len({s.key for s in engine.stage_specs()}), "awaiting_retraining": len(missing)},
        "repaired": engine.last_repair.actions,
    }
    if example_id is not None:
        out["example"] = example_state(engine, example_id)
    return out


def example_state(engine: "S3T", example_id: str) -> dict:
    """Whether an id is live, deleted (honoured, erased, retrained) or unknown: the owner's question, answered with the
    state's key (tombstones are keyed)."""
    live = engine.examples()
    row = live[live["id"] == example_id]
    if len(row):
        r = row.iloc[0]
        return {"id": example_id, "state": "live", "split": r["split"],
                **({"shard": int(r["shard"]), "slice": int(r["slice"])} if r["split"] == "train" else {})}
    tomb = engine.ledger.tombstone(example_id)
    dels = engine.ledger.deletions()
    hit = dels[dels["tombstone"] == tomb]
    if not len(hit):
        return {"id": example_id, "state": "unknown"}
    d = hit.iloc[0]
    return {"id": example_id, "state": "deleted", "tombstone": tomb,
            **{k: (None if pd_isna(d[k]) else str(d[k])) for k in ("requested_at", "honoured_at", "erased_at", "retrained_at")},
            "honoured_by_plan": None if pd_isna(d["honoured_by_plan"]) else int(d["honoured_by_plan"])}


def pd_isna(v) -> bool:
    return bool(pd.isna(v))

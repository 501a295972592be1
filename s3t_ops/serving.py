"""Serving: the plan in force (per shard, the longest stage prefix whose checkpoints are intact under the current
data), its ensemble, the exactness audit, and publishing it to the state's registry.

The plan is computed by the pure planner (planner.py) from the content keys of the current data; recording it is
one ledger transaction, publishing it is idempotent (a crash is finished by the next command's repair).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pandas as pd

from s3t_ops.planner import ServingPlan, serving_plan
from s3t_ops.publish import PlanBundle
from s3t_ops.state import State, StateError
from s3t_ops.training import Rows, StageSpec, Versions, stage_specs

if TYPE_CHECKING:
    from s3t_ops.ensemble import Ensemble


def plan_for(state: State, versions: Versions, rows: Rows, sequences: Iterable[int] | None = None
             ) -> tuple[ServingPlan, dict[int, list[str]]]:
    """Longest prefix with intact checkpoints under `versions`, per shard (ties: validation accuracy). `sequences`
    restricts the choice to some of the trained sequences (e.g. [0]: S3T with B = 1, whose only sequence is the
    first one, reusing its checkpoints)."""
    keep = None if sequences is None else set(sequences)
    by_seq: dict[tuple[int, int], list[StageSpec]] = {}
    for spec in stage_specs(state, versions):
        if keep is None or spec.seq in keep:
            by_seq.setdefault((spec.shard, spec.seq), []).append(spec)
    depths, scores, keys = {}, {}, {}
    for (s, q), chain in by_seq.items():
        d = 0
        for spec in chain:
            if not state.intact(spec.key, rows):
                break
            d = spec.stage
            val = rows[spec.key]["val_acc"]
            scores[(s, q, d)] = float(val) if val is not None and not pd.isna(val) else float("-inf")
        depths[(s, q)] = d
        keys[(s, q)] = [c.key for c in chain[:d]]
    plan = serving_plan(state.cfg.shards, depths, scores)
    return plan, {c.shard: keys[(c.shard, c.seq)] for c in plan.choices}


def current_plan(state: State, sequences: Iterable[int] | None = None) -> tuple[ServingPlan, dict[int, list[str]]]:
    return plan_for(state, state.ledger.slice_versions(state.cfg.shards, state.cfg.slices), state.checkpoint_rows(), sequences)


def plan_record(state: State, plan: ServingPlan, keys: dict[int, list[str]], rows: Rows) -> dict:
    """A served plan as the ledger and the registry keep it; `sha256` lets every door verify each file it loads."""
    return {"plan": plan.to_dict(), "checkpoints": {str(s): k for s, k in keys.items()},
            "sequences": [list(p) for p in state.sequences],
            "sha256": {k: rows[k]["sha256"] for ks in keys.values() for k in ks}}


def plan_in(state: State) -> Callable:
    """For the honour transaction: the plan under the slice versions its connection sees, and its live shards."""
    def compute(con) -> tuple[dict, int]:
        versions = state.ledger.slice_versions(state.cfg.shards, state.cfg.slices, con=con)
        rows = state.checkpoint_rows(con)
        plan, keys = plan_for(state, versions, rows)
        return plan_record(state, plan, keys, rows), len(plan.choices)

    return compute


def serve(state: State, publish_it: bool = True) -> tuple[int, ServingPlan]:
    """Record the current plan as the served one (unless it is already), then publish it (unless told not to)."""
    pid, record = state.ledger.serve_plan(plan_in(state))
    if publish_it:
        publish(state)
    return pid, ServingPlan.from_dict(record["plan"])


def bundle(state: State) -> PlanBundle:
    """What the registry needs of the state to register a plan (and nothing else of it)."""
    rows = state.checkpoint_rows()
    return PlanBundle(config=state.cfg.to_dict(), label_names=list(state.label_names), deleted=sorted(state.ledger.deleted()),
                      read_checkpoint=lambda key: state.checkpoints.read(key, rows[key]["sha256"]),
                      backbone_fingerprint=state.backbone_fingerprint(), tags=dict(state.tags), shards=state.cfg.shards)


def publish(state: State) -> int | None:
    """Tell the publisher about the latest plan if it has not heard of it (idempotent; resumes after a crash)."""
    with state.ledger.locked():  # one publisher at a time: a plan gets one registry version
        latest = state.served()
        if latest is None:
            return None
        pid, record = latest
        published_at, version = state.ledger.publication(pid)
        if published_at is None:
            version = state.publisher.plan_served(pid, record, bundle(state))
            if version is not None or not state.publisher.registers:
                state.ledger.mark_published(pid, version)
        return version


def served_plan(state: State) -> ServingPlan | None:
    latest = state.served()
    return None if latest is None else ServingPlan.from_dict(latest[1]["plan"])


def ensemble(state: State, record: dict | None = None) -> "Ensemble":
    from s3t_ops.ensemble import Ensemble, ShardModel

    if record is None:
        latest = state.served()
        if latest is None:
            raise StateError("no plan has been served yet; run training first")
        record = latest[1]
    models = [ShardModel(int(s), len(keys), [state.load_checkpoint(k) for k in keys])
              for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]
    return Ensemble(state.backbone, models, len(state.label_names))


def evaluate(state: State, split: str = "test", record: dict | None = None) -> float:
    trunk = state.trunk(f"{split}.safetensors")
    logits = ensemble(state, record).logits_from_trunk(trunk)
    return float((logits.argmax(-1) == state.labels(trunk.ids)).float().mean())


def majority_accuracy(state: State, split: str = "test") -> float:
    train = state.ledger.examples("train")
    majority = int(train["label"].mode().iloc[0])
    ev = state.ledger.examples(split)
    return float((ev["label"] == majority).mean())


def audit(state: State, record: dict | None = None) -> dict[str, set[str]]:
    """Exactness audit: served checkpoint key -> tombstones of deleted examples in its lineage ({} = exact)."""
    if record is None:
        latest = state.served()
        record = latest[1] if latest else {"checkpoints": {}}
    deleted = state.ledger.deleted()
    bad = {}
    for keys in record["checkpoints"].values():
        for k in keys:
            hit = state.ledger.lineage(k) & deleted
            if hit:
                bad[k] = hit
    return bad

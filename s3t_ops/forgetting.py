"""Forgetting: honour -> publish -> purge -> erase.

1. honour: one ledger transaction removes the examples, records the new slice versions and a plan over checkpoints
   that never saw them (no gradient step); after a crash the request is either absent or honoured;
2. publish: the registry's `champion` moves to that plan (a registry that fails does not stop what follows);
3. purge: checkpoints trained on a deleted example are deleted (never one the plan serves);
4. erase: every file of the state that held the examples is rewritten without them (erasure.py), the state's own
   files first; the registry's copies after, retried by every command until the registry answers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from s3t_ops.erasure import erase_pending
from s3t_ops.faults import crash_point
from s3t_ops.ledger import HonourReceipt
from s3t_ops.planner import ServingPlan
from s3t_ops.publish import PublishError
from s3t_ops.serving import plan_in, publish
from s3t_ops.state import State
from s3t_ops.training import stage_specs


@dataclass
class ForgetReport:
    new: tuple[str, ...]
    already: tuple[str, ...]
    dirty: tuple[tuple[int, int], ...]
    plan_id: int | None
    plan: ServingPlan | None
    honour_seconds: float  # request received -> new plan committed in the ledger
    publish_seconds: float  # -> registry champion moved (0 without a registry)
    erase_seconds: float  # cached states, slice files, memorization, registry, ledger bytes; stale checkpoints
    purged_checkpoints: int
    model_version: int | None = None
    champion_moved_at: float | None = None  # wall clock (epoch seconds) when the registry served the new plan
    grad_example_steps: int = 0  # honouring never trains


def forget(state: State, ids: Iterable[str], on_honoured: Callable[[HonourReceipt], None] | None = None,
           texts: bool = False) -> ForgetReport:
    """Honour deletions at once, move the registry's champion, then erase their data everywhere.

    `on_honoured(receipt)` is called as soon as the honour committed (the plan pointer already names the new plan):
    a server answers its `/forget` there, while publishing and erasure go on. `texts`: exact texts of live examples
    may stand for their ids (the UI's and the server's forget), resolved in the honour's own ledger connection. Erasure
    of the state's own files never waits on the registry: when the registry fails, the deletion is still honoured and
    erased locally, then PublishError says so (the next command retries the registry)."""
    t0 = time.perf_counter()
    with state.ledger.session():  # one connection (opening one costs milliseconds on the request path)
        ids = state.resolve(ids) if texts else ids
        receipt = state.ledger.honour(ids, plan_in(state), request=state.tags.get("dagster_run_id"))
    state.forget_rows()
    honour = time.perf_counter() - t0
    if on_honoured is not None:
        on_honoured(receipt)
    failed = None
    try:
        version = publish(state)
    except PublishError as exc:
        version, failed = None, exc
    published = time.perf_counter() - t0
    moved_at = time.time() if version is not None else None
    t1 = time.perf_counter()
    purged = purge_stale(state)
    erased = erase_pending(state)
    plan = ServingPlan.from_dict(receipt.record["plan"]) if receipt.record else None
    report = ForgetReport(receipt.new, receipt.already, receipt.dirty, receipt.plan_id, plan, honour,
                          published - honour, time.perf_counter() - t1, purged, version, moved_at)
    reason = str(failed) if failed is not None else erased.registry_error
    if reason:
        raise PublishError(f"{len(receipt.new)} example(s) forgotten: honoured by plan {receipt.plan_id} and erased from the "
                           f"state's files, but {reason}", report=report)
    return report


def purge_stale(state: State) -> int:
    """Delete checkpoints no longer valid under the current data (their lineage holds a deleted id); never one the
    latest plan serves. Their MLflow stage runs go with the registry's erasure (erasure.py)."""
    with state.ledger.locked():
        current = {s.key for s in stage_specs(state)}
        served = state.served()
        keep = {k for keys in (served[1]["checkpoints"].values() if served else []) for k in keys}
        stale = [k for k in state.checkpoint_rows() if k not in current and k not in keep]
        if not stale:
            return 0
        for i, k in enumerate(stale):
            state.checkpoints.delete(k)
            if i == 0:
                crash_point("during_purge")
        state.ledger.mark_purged(stale, "stale: trained on a deleted example")
        state.forget_rows()
    return len(stale)


def deletions_after(state: State, seen: int) -> tuple[int, list[tuple[int, int]], list[str]]:
    """(deletions so far, training cells touched by those after the first `seen`, the requests they came from, e.g.
    Dagster run ids): deletions are append-only, so a count is a cursor (the deletion sensor's)."""
    dels = state.ledger.deletions()
    new = dels.iloc[seen:]
    cells = sorted({(int(r.shard), int(r.slice)) for r in new.itertuples() if r.split == "train"})
    return len(dels), cells, sorted({str(r) for r in new["request"].dropna()})

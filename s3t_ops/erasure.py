"""Erasure: physically remove what remains of deleted examples, idempotently and resumably.

It works from the ledger's list of deleted-but-not-erased tombstones (`erased_at IS NULL`), never only from the ids of
the current call, so a crash anywhere is finished by the next command that opens the state (repair). Each step can run
again safely; the tombstones are marked erased only after all of them (a damaged trunk or slice file, datafiles.py, is
removed or rewritten from the ledger, never parsed):
1. cached trunk files: rows of deleted ids are rewritten away (atomic replace per file: a rename locally, one put on an
   object store; storage.py);
2. slice Parquet files (the pipeline's slice_data): same;
3. the state's other erasers (`State.erasers`): whoever keeps files built from examples registers one, e.g. the
   memorization artifacts (a model trained on the example, lists of ids; memorization/artifacts.py);
4. the ledger file itself: compacted into a fresh copy (DuckDB leaves deleted text in freed blocks); the deletions are
   then marked erased (`erased_at`);
5. the registry, apart and after: versions and runs whose lineage holds a deleted example, stage runs of checkpoints
   trained on one, memorization runs (hard delete); skipped while the latest plan is unpublished, and retried by every
   command while the registry fails (`registry_erased_at` stays empty; `s3t status` says so). The local steps never
   wait on it.
Stale checkpoint files are deleted by `forgetting.purge_stale` (they hold weights, keyed by lineage).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from s3t_ops.datafiles import parse_slice_parquet
from s3t_ops.faults import crash_point
from s3t_ops.publish import PublishError, RegistryErasure
from s3t_ops.serving import audit
from s3t_ops.state import State


@dataclass
class ErasureReport:
    pending: int = 0
    trunk_files: int = 0
    slice_files: int = 0
    others: list[str] = field(default_factory=list)  # what the state's other erasers removed (memorization artifacts)
    registry: list[str] = field(default_factory=list)
    compacted: bool = False
    complete: bool = True  # the registry too (False: it waits for the plan to be published, or failed)
    registry_error: str | None = None  # why the registry's part failed (retried by the next command)


def erase_pending(state: State) -> ErasureReport:
    with state.ledger.locked():  # one eraser at a time (every step is idempotent, but registry deletes are not re-entrant)
        report = _erase_local(state)
        _erase_registry(state, report)
        return report


def _erase_local(state: State) -> ErasureReport:
    """The state's own files first: they never wait on the registry (a broken registry cannot keep data around)."""
    pending = state.ledger.pending_erasure("local")
    report = ErasureReport(pending=len(pending))
    if not pending:
        return report
    keyring = state.ledger.keyring

    def is_deleted(example_id: str) -> bool:
        return keyring.tombstone(example_id) in pending

    report.trunk_files = _erase_trunk(state, is_deleted)
    report.slice_files = _erase_slices(state, is_deleted)
    for eraser in state.erasers:
        report.others += eraser.erase(state.storage, is_deleted)
    state.ledger.compact()
    report.compacted = True
    crash_point("before_erased_mark")
    state.ledger.mark_erased(pending, "local")
    return report


def registry_erasure(state: State) -> RegistryErasure:
    """What the registry needs of the state to find what to erase: plans, their audit, purged checkpoints, artifacts."""
    every = state.ledger.checkpoints(live_only=False)
    stale = set(every[every["purge_reason"].fillna("").str.startswith("stale")]["key"])
    return RegistryErasure(plan_of=state.ledger.plan, tainted=lambda record: bool(audit(state, record)), stale_keys=stale,
                           artifact_alive=lambda name: any(e.alive(state.storage, name) for e in state.erasers),
                           artifact_tags=tuple(sorted({e.run_tag for e in state.erasers})))


def _erase_registry(state: State, report: ErasureReport) -> None:
    """Versions and runs that hold a deleted example, once the champion serves a plan that honours it (else the
    registry would serve nothing better): retried by every command until it succeeds (`s3t status` reports it)."""
    pending = state.ledger.pending_erasure("registry")
    if not pending:
        return
    if state.publisher.registers:
        latest = state.served()
        if latest is not None and state.ledger.publication(latest[0])[0] is None:
            report.complete = False  # the champion may still serve a deleted example: publish first, erase later
            return
        try:
            report.registry = state.publisher.erase(registry_erasure(state))
        except PublishError as exc:
            report.complete = False
            report.registry_error = str(exc)
            return
    state.ledger.mark_erased(pending, "registry")


def _erase_trunk(state: State, is_deleted) -> int:
    """Rewrite every trunk file without the deleted rows; a damaged file (bytes not the recorded ones) is removed
    unread: it is derived data, rebuilt from the live examples when next needed."""
    from s3t_ops.trunk import TrunkCache

    storage = state.storage
    n = 0
    for rel in storage.glob("trunk/*.safetensors"):
        if not state.data_files.intact(rel):
            state.data_files.remove(rel)
            n += 1
            continue
        ids = TrunkCache.read_ids(storage, rel)
        gone = {i for i in ids if is_deleted(i)}
        if gone:
            state.data_files.write(rel, TrunkCache.load(storage, rel).without(gone).to_bytes())
            n += 1
            if n == 1:
                crash_point("during_trunk_erase")
    return n


def _erase_slices(state: State, is_deleted) -> int:
    """Rewrite every slice Parquet file without the deleted rows; a damaged one is rewritten from the ledger."""
    import pandas as pd

    storage = state.storage
    n = 0
    for rel in storage.glob("slices/*.parquet"):
        if state.data_files.intact(rel):
            with storage.open(rel) as f:
                frame = pd.read_parquet(f)
            keep = ~frame["id"].map(is_deleted)
            if keep.all():
                continue
            frame = frame[keep].reset_index(drop=True)
        else:
            frame = state.ledger.members(*parse_slice_parquet(rel))
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        state.data_files.write(rel, buf.getvalue())
        n += 1
        if n == 1:
            crash_point("during_slice_erase")
    return n


def traces(state: State) -> dict[str, int]:
    """Files of the data view (trunk caches, slice Parquet) that still hold a deleted example: location -> rows (-1: a
    damaged file, whose content cannot be told). Empty once erasure has run; the Dagster check
    `slice_data_holds_no_deleted_id` reports it."""
    import pandas as pd

    from s3t_ops.trunk import TrunkCache

    deleted = state.ledger.deleted()
    tomb = state.ledger.keyring.tombstone
    storage = state.storage
    out = {}
    for rel in storage.glob("trunk/*.safetensors"):
        try:
            n = sum(tomb(i) in deleted for i in TrunkCache.read_ids(storage, rel))
        except Exception:  # a damaged header: what it holds cannot be told (erasure removes it)
            n = -1
        if n:
            out[storage.location(rel)] = n
    for rel in storage.glob("slices/*.parquet"):
        try:
            with storage.open(rel) as f:
                n = int(pd.read_parquet(f, columns=["id"])["id"].map(lambda i: tomb(i) in deleted).sum())
        except Exception:
            n = -1
        if n:
            out[storage.location(rel)] = n
    return out

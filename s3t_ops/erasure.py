"""Erasure: physically remove what remains of deleted examples, idempotently and resumably.

It works from the ledger's list of deleted-but-not-erased tombstones (`erased_at IS NULL`), never only
from the ids of the current call, so a crash anywhere is finished by the next command that opens the
state (repair). Each step can run again safely; the tombstones are marked erased only after all of them
(a damaged trunk or slice file, s3t_ops/datafiles.py, is removed or rewritten from the ledger, never parsed):
1. cached trunk files: rows of deleted ids are rewritten away (atomic replace per file: a rename locally,
   one put on an object store; s3t_ops/storage.py);
2. slice Parquet files (the pipeline's slice_data): same;
3. memorization artifacts (a model trained on the example, lists of ids), in the same storage: a folder
   renamed out and deleted locally, an artifact's objects marker first on an object store;
4. the ledger file itself: compacted into a fresh copy (DuckDB leaves deleted text in freed blocks);
   the deletions are then marked erased (`erased_at`);
5. the registry, apart and after: versions and runs whose lineage holds a deleted example, memorization runs
   (hard delete); skipped while the latest plan is unpublished, and retried by every command while the
   registry fails (`registry_erased_at` stays empty; `s3t status` says so). The local steps never wait on it.
Stale checkpoint files are deleted by `S3T.purge_stale` (they hold weights, keyed by lineage).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from s3t_ops.faults import crash_point

if TYPE_CHECKING:
    from s3t_ops.engine import S3T


@dataclass
class ErasureReport:
    pending: int = 0
    trunk_files: int = 0
    slice_files: int = 0
    memorization: list[str] = field(default_factory=list)
    registry: list[str] = field(default_factory=list)
    compacted: bool = False
    complete: bool = True  # the registry too (False: it waits for the plan to be published, or failed)
    registry_error: str | None = None  # why the registry's part failed (retried by the next command)


def erase_pending(engine: "S3T") -> ErasureReport:
    with engine.ledger.locked():  # one eraser at a time (every step is idempotent, but registry deletes are not re-entrant)
        report = _erase_local(engine)
        _erase_registry(engine, report)
        return report


def _erase_local(engine: "S3T") -> ErasureReport:
    """The state's own files first: they never wait on the registry (a broken registry cannot keep data around)."""
    pending = engine.ledger.pending_erasure("local")
    report = ErasureReport(pending=len(pending))
    if not pending:
        return report
    keyring = engine.ledger.keyring

    def is_deleted(example_id: str) -> bool:
        return keyring.tombstone(example_id) in pending

    report.trunk_files = _erase_trunk(engine, is_deleted)
    report.slice_files = _erase_slices(engine, is_deleted)
    from s3t_ops.memorization import store

    report.memorization = store.erase(engine.storage, is_deleted).paths
    engine.ledger.compact()
    report.compacted = True
    crash_point("before_erased_mark")
    engine.ledger.mark_erased(pending, "local")
    return report


def _erase_registry(engine: "S3T", report: ErasureReport) -> None:
    """Versions and runs that hold a deleted example, once the champion serves a plan that honours it (else the
    registry would serve nothing better): retried by every command until it succeeds (`s3t status` reports it)."""
    from s3t_ops.publish import PublishError

    pending = engine.ledger.pending_erasure("registry")
    if not pending:
        return
    if engine.publisher.registers:
        latest = engine.served()
        if latest is not None and engine.ledger.publication(latest[0])[0] is None:
            report.complete = False  # the champion may still serve a deleted example: publish first, erase later
            return
        try:
            report.registry = engine.publisher.erase(engine)
        except PublishError as exc:
            report.complete = False
            report.registry_error = str(exc)
            return
    engine.ledger.mark_erased(pending, "registry")


def _erase_trunk(engine: "S3T", is_deleted) -> int:
    """Rewrite every trunk file without the deleted rows; a damaged file (bytes not the recorded ones) is removed
    unread: it is derived data, rebuilt from the live examples when next needed."""
    from s3t_ops.trunk import TrunkCache

    storage = engine.storage
    n = 0
    for rel in storage.glob("trunk/*.safetensors"):
        if not engine.data_files.intact(rel):
            engine.data_files.remove(rel)
            n += 1
            continue
        ids = TrunkCache.read_ids(storage, rel)
        gone = {i for i in ids if is_deleted(i)}
        if gone:
            engine.data_files.write(rel, TrunkCache.load(storage, rel).without(gone).to_bytes())
            n += 1
            if n == 1:
                crash_point("during_trunk_erase")
    return n


def _erase_slices(engine: "S3T", is_deleted) -> int:
    """Rewrite every slice Parquet file without the deleted rows; a damaged one is rewritten from the ledger."""
    import io

    import pandas as pd

    storage = engine.storage
    n = 0
    for rel in storage.glob("slices/*.parquet"):
        if engine.data_files.intact(rel):
            with storage.open(rel) as f:
                frame = pd.read_parquet(f)
            keep = ~frame["id"].map(is_deleted)
            if keep.all():
                continue
            frame = frame[keep].reset_index(drop=True)
        else:
            shard, slc = (int(x) for x in rel.removeprefix("slices/s").removesuffix(".parquet").split("-j"))
            frame = engine.ledger.members(shard, slc)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        engine.data_files.write(rel, buf.getvalue())
        n += 1
        if n == 1:
            crash_point("during_slice_erase")
    return n


def traces(engine: "S3T") -> dict[str, int]:
    """Files of the data view (trunk caches, slice Parquet) that still hold a deleted example: location -> rows.
    Empty once erasure has run; the Dagster check `slice_data_holds_no_deleted_id` reports it."""
    import pandas as pd

    from s3t_ops.trunk import TrunkCache

    deleted = engine.ledger.deleted()
    tomb = engine.ledger.keyring.tombstone
    storage = engine.storage
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

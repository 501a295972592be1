"""Erasure: physically remove what remains of deleted examples, idempotently and resumably.

It works from the ledger's list of deleted-but-not-erased tombstones (`erased_at IS NULL`), never only
from the ids of the current call, so a crash anywhere is finished by the next command that opens the
state (repair). Each step can run again safely; the tombstones are marked erased only after all of them:
1. cached trunk files: rows of deleted ids are rewritten away (atomic replace per file: a rename locally,
   one put on an object store; s3t_ops/storage.py);
2. slice Parquet files (the pipeline's slice_data): same;
3. memorization artifacts (a model trained on the example, lists of ids), in the same storage: a folder
   renamed out and deleted locally, an artifact's objects marker first on an object store;
4. the registry: versions and runs whose lineage holds a deleted example, memorization runs
   (hard delete); skipped, and the tombstones left pending, while the latest plan is unpublished;
5. the ledger file itself: compacted into a fresh copy (DuckDB leaves deleted text in freed blocks).
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
    complete: bool = True


def erase_pending(engine: "S3T") -> ErasureReport:
    with engine.ledger.locked():  # one eraser at a time (every step is idempotent, but registry deletes are not re-entrant)
        return _erase_pending(engine)


def _erase_pending(engine: "S3T") -> ErasureReport:
    pending = engine.ledger.pending_erasure()
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
    latest = engine.served()
    unpublished = latest is not None and engine.ledger.publication(latest[0])[0] is None
    if engine.publisher.registers and unpublished:
        report.complete = False  # the champion may still serve a deleted example: publish first, erase later
    else:
        report.registry = engine.publisher.erase(engine)
    engine.ledger.compact()
    report.compacted = True
    if report.complete:
        crash_point("before_erased_mark")
        engine.ledger.mark_erased(pending)
    return report


def _erase_trunk(engine: "S3T", is_deleted) -> int:
    from s3t_ops.trunk import TrunkCache

    storage = engine.storage
    n = 0
    for rel in storage.glob("trunk/*.safetensors"):
        ids = TrunkCache.read_ids(storage, rel)
        gone = {i for i in ids if is_deleted(i)}
        if gone:
            TrunkCache.load(storage, rel).without(gone).save(storage, rel)
            n += 1
            if n == 1:
                crash_point("during_trunk_erase")
    return n


def _erase_slices(engine: "S3T", is_deleted) -> int:
    import io

    import pandas as pd

    storage = engine.storage
    n = 0
    for rel in storage.glob("slices/*.parquet"):
        with storage.open(rel) as f:
            frame = pd.read_parquet(f)
        keep = ~frame["id"].map(is_deleted)
        if not keep.all():
            buf = io.BytesIO()
            frame[keep].reset_index(drop=True).to_parquet(buf, index=False)
            storage.write_bytes(rel, buf.getvalue())
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
        n = sum(tomb(i) in deleted for i in TrunkCache.read_ids(storage, rel))
        if n:
            out[storage.location(rel)] = n
    for rel in storage.glob("slices/*.parquet"):
        with storage.open(rel) as f:
            n = int(pd.read_parquet(f, columns=["id"])["id"].map(lambda i: tomb(i) in deleted).sum())
        if n:
            out[storage.location(rel)] = n
    return out

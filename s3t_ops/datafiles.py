"""The state's derived data files (trunk cache, slice Parquet): where they are, and the sha256 each was written
with, in the ledger.

Both are derived from the ledger's live examples, so a file that does not hold the bytes recorded for it (a
flipped bit, a truncated copy, a crash between writing it and recording its hash) is never read: the caller
rebuilds it from the ledger and the backbone. The check is the whole file's sha256, remembered per file stamp
(size and mtime locally, the object's key elsewhere), so a file is hashed once per change, not once per read.
"""
from __future__ import annotations

import hashlib
from collections.abc import Hashable

from s3t_ops.ledger import Ledger
from s3t_ops.storage import Storage

PREFIXES = ("trunk", "slices")


def slice_file(shard: int, slc: int) -> str:
    """A training slice's trunk cache file name."""
    return f"train-s{shard}-j{slc}.safetensors"


def slice_of(name: str) -> tuple[int, int] | None:
    """(shard, slice) of a training slice's trunk cache file name; None for val/test."""
    if not name.startswith("train-s"):
        return None
    s, j = name.removeprefix("train-s").removesuffix(".safetensors").split("-j")
    return int(s), int(j)


def trunk_file(name: str) -> str:
    """A trunk cache file's path in the storage (`name`: a training slice's file, val or test)."""
    return f"trunk/{name}"


def slice_parquet(shard: int, slc: int) -> str:
    """A slice's Parquet file's path in the storage (the pipeline's slice_data)."""
    return f"slices/s{shard}-j{slc}.parquet"


def parse_slice_parquet(rel: str) -> tuple[int, int]:
    shard, slc = (int(x) for x in rel.removeprefix("slices/s").removesuffix(".parquet").split("-j"))
    return shard, slc


class DataFiles:
    def __init__(self, storage: Storage, ledger: Ledger):
        self.storage = storage
        self.ledger = ledger
        self._verified: dict[str, Hashable] = {}  # rel -> stamp whose bytes matched the ledger

    def write(self, rel: str, data: bytes) -> str:
        """Atomic write (storage.py), then the hash recorded: a crash in between leaves a file whose hash is not
        the recorded one, which the next reader rebuilds. Returns the file's location."""
        location = self.storage.write_bytes(rel, data)
        self.ledger.record_file(rel, hashlib.sha256(data).hexdigest())
        self._verified.pop(rel, None)
        return location

    def intact(self, rel: str) -> bool:
        """Present, and holding the bytes recorded for it."""
        stamp = self.storage.stamp(rel)
        if stamp is None:
            return False
        if self._verified.get(rel) == stamp:
            return True
        expected = self.ledger.file_sha(rel)
        if expected is None:
            return False
        try:
            ok = hashlib.sha256(self.storage.read_bytes(rel)).hexdigest() == expected
        except FileNotFoundError:
            return False
        if ok:
            self._verified[rel] = stamp
        return ok

    def remove(self, rel: str) -> bool:
        self._verified.pop(rel, None)
        removed = self.storage.remove(rel)
        self.ledger.record_file(rel, None)
        return removed

    def hashes_on_disk(self) -> dict[str, str]:
        """sha256 of every data file as it is now (a state from before hashes were recorded trusts its files once)."""
        out = {}
        for prefix in PREFIXES:
            for rel in self.storage.glob(f"{prefix}/*"):
                if ".tmp-" not in rel:
                    out[rel] = hashlib.sha256(self.storage.read_bytes(rel)).hexdigest()
        return out


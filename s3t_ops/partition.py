"""Example -> (shard, slice) from a hash of its id: stable under deletion of any other example."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable


def assign(example_id: str, shards: int, slices: int, seed: int = 0) -> tuple[int, int]:
    """A pure function of the id, so deleting other examples can never move this one."""
    h = int(hashlib.sha256(f"cell|{seed}|{example_id}".encode()).hexdigest()[:16], 16)
    cell = h % (shards * slices)
    return cell // slices, cell % slices


def assign_all(ids: Iterable[str], shards: int, slices: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    return {i: assign(i, shards, slices, seed) for i in ids}

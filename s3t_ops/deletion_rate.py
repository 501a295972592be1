"""Deletion-rate analysis for S3T and SISA.

Pure functions (no I/O): how many uniform deletion requests a set of
training sequences absorbs before every shard is dead, as closed forms and as
a Monte-Carlo simulation that runs the actual sequences through the planner's
valid-prefix rule; and how deep a shard can still serve after one deletion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from s3t_ops.planner import valid_prefix

__all__ = [
    "harmonic",
    "deletion_rate_closed_form",
    "sisa_kill_rate_closed_form",
    "simulate_deletion_rate",
    "expected_best_prefix_single_deletion",
]

# Above this L the 2^L dead-state table gets too big; see _dead_table.
_MAX_TABLE_L = 16


def harmonic(n: int) -> float:
    """H(n) = 1 + 1/2 + ... + 1/n, the coupon-collector factor."""
    if n < 0:
        raise ValueError(f"harmonic needs n >= 0, got {n}")
    return math.fsum(1.0 / k for k in range(1, n + 1))


def deletion_rate_closed_form(m: int, L: int, b_prime: int) -> float:
    """Expected uniform deletions until all shards die, with b_prime distinct first slices per shard.

    A shard dies once all of its b_prime first slices are hit: coupon collector
    over m*b_prime targets among m*L cells.
    """
    return m * L * harmonic(m * b_prime)


def sisa_kill_rate_closed_form(m: int) -> float:
    """SISA baseline: any hit kills a shard, so it is coupon collector over m shards."""
    return m * harmonic(m)


def _dead_table(perms: Sequence[Sequence[int]], L: int) -> np.ndarray:
    """dead[mask] for every dirty-slice bitmask, computed with valid_prefix itself."""
    n = 1 << L
    table = np.empty(n, dtype=bool)
    for mask in range(n):
        dirty = {j for j in range(L) if mask >> j & 1}
        table[mask] = all(valid_prefix(p, dirty) == 0 for p in perms)
    return table


def simulate_deletion_rate(
    perms: Sequence[Sequence[int]],
    m: int,
    L: int,
    trials: int = 20000,
    seed: int = 0,
    mode: str = "prefix",
) -> float:
    """Monte-Carlo count of uniform deletion requests until every shard is dead.

    Measures the actual perms (not the formula) so the closed form can be
    checked.  mode="kill" models SISA: a shard dies at its first hit, so it
    draws shards uniformly until all m have been hit.  All trials advance in
    lock-step so the loop runs once per request, not once per trial.
    """
    if m < 1 or L < 1 or trials < 1:
        raise ValueError(f"need m, L, trials >= 1, got m={m}, L={L}, trials={trials}")
    rng = np.random.Generator(np.random.PCG64(seed))

    if mode == "kill":
        n_cells, width = m, 1
        dead = np.array([False, True])
    elif mode == "prefix":
        if not perms:
            raise ValueError("need at least one sequence")
        for p in perms:
            if sorted(p) != list(range(L)):
                raise ValueError(f"sequence {tuple(p)} is not a permutation of 0..{L - 1}")
        n_cells, width = m * L, L
        if L <= _MAX_TABLE_L:
            dead = _dead_table(perms, L)
        else:
            # valid_prefix(p, d) == 0 iff p[0] in d, so dead <=> all first slices dirty.
            need = 0
            for p in perms:
                need |= 1 << p[0]
            dead = None
    else:
        raise ValueError(f"unknown mode {mode!r}; valid modes: prefix, kill")

    masks = np.zeros((trials, m), dtype=np.int64)
    active = np.arange(trials)
    counts = np.zeros(trials, dtype=np.int64)
    step = 0
    while active.size:
        step += 1
        cell = rng.integers(0, n_cells, size=active.size)
        shard, slice_ = np.divmod(cell, width)
        masks[active, shard] |= np.int64(1) << slice_
        sub = masks[active]
        if dead is not None:
            shard_dead = dead[sub]
        else:
            shard_dead = (sub & need) == need
        done = shard_dead.all(axis=1)
        counts[active[done]] = step
        active = active[~done]
    return float(counts.mean())


def expected_best_prefix_single_deletion(perms: Sequence[Sequence[int]], L: int) -> float:
    """Mean servable depth after one uniformly placed deletion: how well a set hedges."""
    if not perms:
        raise ValueError("need at least one sequence")
    return sum(max(valid_prefix(p, {j}) for p in perms) for j in range(L)) / L

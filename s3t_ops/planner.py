"""Deletion bookkeeping and model selection for S3T serving.

Pure functions: given which slices are dirty, decide which stored stage of
which sequence each shard serves, which stages must be retrained, and how
many deletions the system absorbs before every shard is gone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "valid_prefix",
    "affected_slices",
    "ShardChoice",
    "ServingPlan",
    "serving_plan",
    "plan_for_deletions",
    "stages_to_retrain",
    "harmonic",
    "deletion_rate_closed_form",
    "sisa_kill_rate_closed_form",
    "simulate_deletion_rate",
    "expected_best_prefix_single_deletion",
]

# Above this L the 2^L dead-state table gets too big; see _dead_table.
_MAX_TABLE_L = 16


def valid_prefix(perm: Sequence[int], dirty: Collection[int]) -> int:
    """Stages 1..k stay exact only while none of their slices was deleted."""
    k = 0
    for s in perm:
        if s in dirty:
            break
        k += 1
    return k


def affected_slices(
    deleted_ids: Iterable[str], assignment: Mapping[str, tuple[int, int]]
) -> dict[int, frozenset[int]]:
    """Collapse example-level deletions to the (shard, slice) cells they touch.

    Unknown ids are an error rather than a no-op: silently ignoring them could
    leave deleted data in served models.
    """
    out: dict[int, set[int]] = {}
    unknown: list[str] = []
    for ex in deleted_ids:
        cell = assignment.get(ex)
        if cell is None:
            unknown.append(ex)
            continue
        shard, slice_ = cell
        out.setdefault(int(shard), set()).add(int(slice_))
    if unknown:
        names = sorted(set(unknown))
        shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
        raise KeyError(f"{len(names)} unknown example id(s): {shown}")
    return {s: frozenset(v) for s, v in sorted(out.items())}


@dataclass(frozen=True)
class ShardChoice:
    """The model a live shard serves: stage `depth` of sequence `seq`."""

    shard: int
    seq: int
    depth: int
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "seq": self.seq, "depth": self.depth, "score": self.score}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardChoice:
        score = d.get("score")
        return cls(
            shard=int(d["shard"]),
            seq=int(d["seq"]),
            depth=int(d["depth"]),
            score=None if score is None else float(score),
        )


@dataclass(frozen=True)
class ServingPlan:
    """Which model each shard serves; shards without a choice drop out of the ensemble."""

    m: int
    choices: tuple[ShardChoice, ...]

    def __post_init__(self) -> None:
        shards = [c.shard for c in self.choices]
        if shards != sorted(set(shards)):
            raise ValueError(f"choices must be sorted by shard and unique, got {shards}")
        if shards and not (0 <= shards[0] and shards[-1] < self.m):
            raise ValueError(f"choice shards {shards} out of range 0..{self.m - 1}")
        if any(c.depth < 1 for c in self.choices):
            raise ValueError("a live shard must serve depth >= 1")

    @property
    def live_shards(self) -> tuple[int, ...]:
        return tuple(c.shard for c in self.choices)

    @property
    def dead_shards(self) -> tuple[int, ...]:
        live = set(self.live_shards)
        return tuple(s for s in range(self.m) if s not in live)

    def to_dict(self) -> dict[str, Any]:
        return {"m": self.m, "choices": [c.to_dict() for c in self.choices]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServingPlan:
        return cls(
            m=int(d["m"]),
            choices=tuple(ShardChoice.from_dict(c) for c in d["choices"]),
        )


def serving_plan(
    m: int,
    depths: Mapping[tuple[int, int], int],
    scores: Mapping[tuple[int, int, int], float] | None = None,
) -> ServingPlan:
    """Serve the deepest valid model per shard.

    Depth wins because it means more training data; validation score breaks
    ties, and the lowest sequence index makes the choice deterministic.
    """
    scores = scores or {}
    best: dict[int, tuple[int, float, int]] = {}
    for (shard, seq), depth in depths.items():
        if not 0 <= shard < m:
            raise ValueError(f"shard {shard} out of range 0..{m - 1}")
        if depth < 0:
            raise ValueError(f"negative depth {depth} for shard {shard}, seq {seq}")
        if depth == 0:
            continue
        sc = scores.get((shard, seq, depth), -math.inf)
        key = (depth, sc, -seq)
        cur = best.get(shard)
        if cur is None or key > (cur[0], cur[1], -cur[2]):
            best[shard] = (depth, sc, seq)
    choices = tuple(
        ShardChoice(
            shard=s,
            seq=seq,
            depth=depth,
            score=scores.get((s, seq, depth)),
        )
        for s, (depth, _, seq) in sorted(best.items())
    )
    return ServingPlan(m=m, choices=choices)


def plan_for_deletions(
    perms: Sequence[Sequence[int]],
    m: int,
    dirty: Mapping[int, Collection[int]],
    trained: Mapping[tuple[int, int], int] | None = None,
    scores: Mapping[tuple[int, int, int], float] | None = None,
) -> ServingPlan:
    """Serving plan after deletions, capped by what has actually been trained.

    `trained` lets a partially trained (or partially retrained) system be
    planned; missing entries mean the sequence is fully trained.
    """
    trained = trained or {}
    depths: dict[tuple[int, int], int] = {}
    for s in range(m):
        d = dirty.get(s, ())
        for q, perm in enumerate(perms):
            depths[(s, q)] = min(trained.get((s, q), len(perm)), valid_prefix(perm, d))
    return serving_plan(m, depths, scores)


def stages_to_retrain(
    perms: Sequence[Sequence[int]], m: int, dirty: Mapping[int, Collection[int]]
) -> list[tuple[int, int, int]]:
    """(shard, seq, stage) triples invalidated by the deletions.

    Stage k is trained on slices pi(1..k), so it is stale exactly when k is at
    or past the first dirty position.
    """
    out: list[tuple[int, int, int]] = []
    for s in range(m):
        d = dirty.get(s, ())
        if not d:
            continue
        for q, perm in enumerate(perms):
            k = valid_prefix(perm, d) + 1
            out.extend((s, q, stage) for stage in range(k, len(perm) + 1))
    return sorted(out)


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

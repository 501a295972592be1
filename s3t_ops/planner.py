"""Deletion bookkeeping and model selection for S3T serving.

Pure functions: given which slices are dirty, decide which stored stage of
which sequence each shard serves (which stages must retrain is the engine's
content addressing: training.missing_stages).  How
many deletions the system absorbs before every shard is gone is analysed in
`s3t_ops.deletion_rate`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "valid_prefix",
    "ShardChoice",
    "ServingPlan",
    "serving_plan",
    "plan_for_deletions",
]

def valid_prefix(perm: Sequence[int], dirty: Collection[int]) -> int:
    """Stages 1..k stay exact only while none of their slices was deleted."""
    k = 0
    for s in perm:
        if s in dirty:
            break
        k += 1
    return k


class NoLiveShardError(RuntimeError):
    """Every shard lost its valid prefix: nothing can be served until stages retrain."""


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

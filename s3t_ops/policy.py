"""Retraining policies: which stale (shard, sequence) chains to retrain now, and which to leave for later.

Pure functions over chain costs (no I/O). The planner keeps serving the best valid prefix of every shard
whatever is chosen here, so a policy trades compute against how soon shards climb back to full depth:

- `all`: every stale chain (the stages of every sequence that saw a deleted example);
- `cheapest`: per shard, only the chain that is cheapest to bring back to full depth, i.e. the sequence whose
  deleted slice sits latest (fewest, smallest stages to redo); the shard serves it at full depth again, the
  other sequences wait for a later run (docs/algorithm.md, "Retraining policies").

An optional `budget` (gradient example-steps) caps one run: chains are taken in policy order (every shard's
cheapest first, then every shard's second cheapest, ...) while they fit in what is left; a chain that does
not fit is skipped for a smaller one. Within one rank, shards that serve the shallowest prefix now go first
(`served`): a shard that serves nothing gains its whole depth from its cheapest chain, while a shard that
still serves full depth through another sequence gains only resilience, so under a tight budget the first
must not wait behind the second (a 5-day stream at 1,000 tweets left a shard serving nothing for three
nights when cost alone ordered them: BENCHMARKS.md). Costs are example-steps: live examples of each stage's
prefix times the epochs, summed over the chain's stages that must retrain.
"""
from __future__ import annotations

from collections.abc import Mapping

POLICIES = ("all", "cheapest")


def select_chains(costs: Mapping[tuple[int, int], int], policy: str = "all", budget: int | None = None,
                  served: Mapping[int, int] | None = None) -> list[tuple[int, int]]:
    """The (shard, sequence) chains to retrain now, in the order to train them.

    `costs`: example-steps to bring each stale chain back to full depth. `served`: the depth each shard serves
    now (`served_depths`; omitted: all alike). Order: rank within the shard (cheapest first), then the shard's
    served depth (shallowest first), then cost, then (shard, sequence), so the result is deterministic."""
    if policy not in POLICIES:
        raise ValueError(f"retraining policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if budget is not None and budget < 0:
        raise ValueError(f"the retraining budget must be >= 0 example-steps, got {budget}")
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for (s, q), c in costs.items():
        by_shard.setdefault(s, []).append((c, q))
    ranked = []
    for s, chains in by_shard.items():
        for rank, (c, q) in enumerate(sorted(chains)):
            if policy == "cheapest" and rank > 0:
                break
            ranked.append((rank, (served or {}).get(s, 0), c, s, q))
    chosen, left = [], budget
    for _rank, _depth, c, s, q in sorted(ranked):
        if left is not None:
            if c > left:
                continue
            left -= c
        chosen.append((s, q))
    return chosen


def served_depths(first_stale: Mapping[tuple[int, int], int], shards: int, sequences: int, depth: int) -> dict[int, int]:
    """The depth each shard can serve now: its longest intact prefix over its sequences. `first_stale`: the first
    stale stage of every stale (shard, sequence) chain (1-based); a sequence not in it is intact to `depth`."""
    return {s: max(first_stale.get((s, q), depth + 1) - 1 for q in range(sequences)) for s in range(shards)}

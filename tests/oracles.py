"""Independent models the tests check the engine against: written from the paper's definitions, not from the
engine's code (which decides staleness by content keys, training.missing_stages)."""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import torch

from s3t_ops.planner import valid_prefix


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


def split_full_state(state: dict[str, torch.Tensor], groups: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(every group's LoRA state, the head state) of a full-LoRA state (its keys `g<k>.*`, `head.*`)."""
    loras = []
    for k in range(1, groups + 1):
        prefix = f"g{k}."
        loras.append({key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)})
    return loras, {key[len("head."):]: t for key, t in state.items() if key.startswith("head.")}

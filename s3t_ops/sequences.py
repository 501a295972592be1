"""Training-sequence selection for S3T.

Each shard trains B permutations ("sequences") of its L slices.  Which
permutations are chosen decides how much of a shard survives a deletion:
a deletion in slice j invalidates every stage at or after j's position, so
good sets put every slice late in at least one sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "cyclic",
    "permutation_tree",
    "prefix_score",
    "bms",
    "select_sequences",
    "positions",
    "SELECTIONS",
]

# Stand-in for -inf in the assignment problem: scipy rejects infinite costs,
# and real scores are bounded by L(L+1)/2, so this always loses.
_FORBIDDEN = -1e12


def _rotate(seq: tuple[int, ...], r: int) -> tuple[int, ...]:
    """Right-rotate by r; written without negative slicing so r=0 is the identity."""
    n = len(seq)
    r %= n if n else 1
    return seq[n - r:] + seq[: n - r]


def cyclic(L: int, B: int) -> list[tuple[int, ...]]:
    """First B rotations of (0..L-1).

    All L rotations form a Latin square, so every slice is last in exactly
    one sequence and any single deletion leaves a prefix of length L-1.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got L={L}")
    if not 1 <= B <= L:
        raise ValueError(
            f"cyclic needs 1 <= B <= L (only L={L} distinct rotations), got B={B}"
        )
    base = tuple(range(L))
    return [_rotate(base, r) for r in range(B)]


def permutation_tree(L: int, B: int) -> list[tuple[int, ...]]:
    """Up to L! sequences by rotating ever shorter suffixes.

    Extends cyclic() beyond B = L while keeping early sequences diverse in
    their first positions (the ones that matter most for surviving deletions).
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got L={L}")
    total = math.factorial(L)
    if not 1 <= B <= total:
        raise ValueError(f"permutation_tree needs 1 <= B <= L! = {total}, got B={B}")

    level = cyclic(L, L)
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()

    def add(seqs: Sequence[tuple[int, ...]]) -> bool:
        for s in seqs:
            if s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == B:
                    return True
        return False

    if add(level):
        return out
    for d in range(1, L - 1):
        nxt: list[tuple[int, ...]] = []
        for seq in level:
            prefix, suffix = seq[:d], seq[d:]
            nxt.extend(prefix + _rotate(suffix, r) for r in range(len(suffix)))
        level = nxt
        if add(level):
            return out
    # Unreachable: the last level holds all L! permutations.
    raise AssertionError("permutation tree exhausted before reaching B")


def _validate_prior(prior: Sequence[float]) -> np.ndarray:
    arr = np.asarray(prior, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("prior must be a non-empty 1-D sequence of probabilities")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"prior must be finite and non-negative, got {list(prior)}")
    return arr


def prefix_score(prefix: Sequence[int], prior: Sequence[float], t: float = 100.0) -> float:
    """Expected-survival proxy of a (partial) sequence.

    Stage n is worth n (deeper models are better) weighted by (1 - c_n)^t, a
    smooth stand-in for the chance that none of its first n slices is hit.
    """
    total = 0.0
    cum = 0.0
    for n, slice_ in enumerate(prefix, start=1):
        cum += float(prior[slice_])
        total += n * (1.0 - cum) ** t
    return total


def bms(prior: Sequence[float], B: int, t: float = 100.0) -> list[tuple[int, ...]]:
    """Pick B sequences that push likely-deleted slices to the back.

    Greedy column-by-column max-weight assignment keeps the L candidates a
    Latin square (each slice used once per position) while favouring
    low-risk slices early; the best B by full-sequence score are returned.
    """
    from scipy.optimize import linear_sum_assignment  # imported here: config.py reads SELECTIONS from this module

    arr = _validate_prior(prior)
    L = arr.size
    if not 1 <= B <= L:
        raise ValueError(f"bms needs 1 <= B <= L={L}, got B={B}")

    seqs: list[tuple[int, ...]] = [(i,) for i in range(L)]
    for _ in range(L - 1):
        score = np.full((L, L), _FORBIDDEN)
        for i, seq in enumerate(seqs):
            used = set(seq)
            for j in range(L):
                if j not in used:
                    score[i, j] = prefix_score(seq + (j,), arr, t)
        rows, cols = linear_sum_assignment(score, maximize=True)
        new = list(seqs)
        for i, j in zip(rows, cols):
            if j in seqs[i]:  # pragma: no cover - Hall's theorem rules this out
                raise AssertionError("assignment picked an already-used slice")
            new[i] = seqs[i] + (int(j),)
        seqs = new

    ranked = sorted(seqs, key=lambda s: (-prefix_score(s, arr, t), s))
    return ranked[:B]


def _select_cyclic(L: int, B: int, prior: Sequence[float] | None) -> list[tuple[int, ...]]:
    if B > L:
        raise ValueError(
            f"cyclic supports at most B=L={L} sequences, got B={B}; "
            "use method 'tree' for B > L"
        )
    return cyclic(L, B)


def _select_tree(L: int, B: int, prior: Sequence[float] | None) -> list[tuple[int, ...]]:
    return permutation_tree(L, B)


def _select_bms(L: int, B: int, prior: Sequence[float] | None) -> list[tuple[int, ...]]:
    if prior is None:
        prior = [1.0 / L] * L
    if len(prior) != L:
        raise ValueError(f"bms prior must have length L={L}, got {len(prior)}")
    return bms(prior, B)


_SELECTORS: dict[str, Callable[[int, int, Sequence[float] | None], list[tuple[int, ...]]]] = {
    "cyclic": _select_cyclic,
    "tree": _select_tree,
    "bms": _select_bms,
}

# The selection strategies, in one place: config validation and every CLI read this.
SELECTIONS: tuple[str, ...] = tuple(_SELECTORS)


def select_sequences(
    method: str, L: int, B: int, prior: Sequence[float] | None = None
) -> list[tuple[int, ...]]:
    """Single entry point so configs can name the selection strategy (one of SELECTIONS)."""
    select = _SELECTORS.get(method)
    if select is None:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(SELECTIONS)}")
    return select(L, B, prior)


def positions(perms: Sequence[Sequence[int]]) -> list[dict[int, int]]:
    """1-based position of each slice per sequence: the first stage a deletion kills."""
    return [{s: k for k, s in enumerate(p, start=1)} for p in perms]

"""RUM, the Refined-Unlearning Meta-algorithm (docs/memorization.md, "## RUM").

Refine the forget set F by memorization rank into low / mid / high (mid = the examples ranked
closest to the median), then unlearn sequentially low -> mid -> high, each step starting from the
previous step's model; examples of F not processed yet stay in the retain set of that step.
RUM^F uses one method for every bin (e.g. NegGrad+ with per-bin hyper-parameters); full RUM picks a
method per bin. Controls: vanilla (the method on all of F at once) and shuffle (the same sequential
procedure on random bins of the same sizes).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from s3t_ops.memorization.config import BINS, MethodConfig
from s3t_ops.memorization.methods import UnlearnResult, unlearn
from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State


def bin_sizes(n: int) -> dict[str, int]:
    """Thirds by rank: low and high get n // 3 each, mid the rest (so mid is never the smaller one)."""
    third = n // 3
    return {"low": third, "mid": n - 2 * third, "high": third}


def split_bins(scores: pd.Series, ids: Sequence[str] | None = None, sizes: Mapping[str, int] | None = None) -> dict[str, list[str]]:
    """Split `ids` (default: the index of `scores`) by memorization rank (higher score = more memorized).

    Ties are broken by id so the split is deterministic. Bins keep rank order: every score in `low` is
    <= every score in `mid` <= every score in `high`.
    """
    ids = list(scores.index if ids is None else ids)
    missing = [i for i in ids if i not in scores.index]
    if missing:
        raise KeyError(f"no memorization score for {len(missing)} forget id(s), e.g. {missing[:3]}")
    values = scores.reindex(ids).to_numpy(dtype=float)
    if np.isnan(values).any():
        bad = [i for i, v in zip(ids, values) if np.isnan(v)]
        raise ValueError(f"memorization score is NaN for {len(bad)} id(s), e.g. {bad[:3]}")
    ranked = [i for _, i in sorted(zip(values, ids))]
    sizes = dict(bin_sizes(len(ids)) if sizes is None else sizes)
    if sum(sizes.values()) != len(ids):
        raise ValueError(f"bin sizes {sizes} do not add up to {len(ids)} ids")
    out, start = {}, 0
    for name in BINS:
        n = sizes.get(name, 0)
        out[name] = ranked[start:start + n]
        start += n
    return out


def shuffle_bins(bins: Mapping[str, Sequence[str]], seed: int = 0) -> dict[str, list[str]]:
    """The shuffle control: the same bin sizes, members drawn at random from the pooled forget set."""
    pooled = sorted(i for name in BINS for i in bins.get(name, []))
    perm = np.random.default_rng(seed).permutation(len(pooled))
    pooled = [pooled[j] for j in perm]
    out, start = {}, 0
    for name in BINS:
        n = len(bins.get(name, []))
        out[name] = pooled[start:start + n]
        start += n
    return out


def uniform_schedule(mcfg: MethodConfig) -> dict[str, MethodConfig]:
    """RUM^F with the same method and hyper-parameters in every bin."""
    return {name: mcfg for name in BINS}


@dataclass
class RUMStep:
    bin: str
    forget_ids: list[str]
    n_retain: int
    result: UnlearnResult


@dataclass
class RUMResult:
    state: State
    bins: dict[str, list[str]]  # the examples each step forgot (after any re-ranking)
    steps: list[RUMStep] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def grad_example_steps(self) -> int:
        return sum(s.result.grad_example_steps for s in self.steps)

    def summary(self) -> list[dict]:
        return [{"bin": s.bin, "method": s.result.method, "n_forget": len(s.forget_ids), "n_retain": s.n_retain,
                 "steps": s.result.steps, "grad_example_steps": s.result.grad_example_steps, "seconds": s.result.seconds} for s in self.steps]


def run_rum(
    clf: MonolithicClassifier,
    state: State,
    data: LabeledTrunk,
    forget_ids: Sequence[str],
    scores: pd.Series,
    schedule: Mapping[str, MethodConfig],
    seed: int = 0,
    shuffle: bool = False,
    rescore: Callable[[State, list[str]], pd.Series] | None = None,
) -> RUMResult:
    """Sequential unlearning low -> mid -> high.

    scores: memorization per id (higher = more memorized; orient proxies with
    `proxies.memorization_score`). rescore(state, remaining_forget_ids), when given, is called after
    every step but the last and re-ranks the forget examples not processed yet (e.g. holdout
    retraining recomputed on the current model); the remaining bins keep their sizes.
    """
    t0 = time.perf_counter()
    forget_ids = list(dict.fromkeys(forget_ids))
    unknown = set(forget_ids) - set(data.ids)
    if unknown:
        raise KeyError(f"{len(unknown)} forget id(s) are not training examples, e.g. {sorted(unknown)[:3]}")
    missing = [b for b in BINS if b not in schedule]
    if missing:
        raise ValueError(f"the schedule needs a method for bin(s) {missing}")
    bins = split_bins(scores, forget_ids)
    if shuffle:
        bins = shuffle_bins(bins, seed)
    sizes = {name: len(bins[name]) for name in BINS}
    done: list[str] = []
    result = RUMResult(state=state, bins={})
    for t, name in enumerate(BINS):
        if t > 0 and rescore is not None and not shuffle:
            remaining = [i for b in BINS[t:] for i in bins[b]]
            fresh = split_bins(rescore(result.state, remaining), remaining, {**{b: 0 for b in BINS[:t]}, **{b: sizes[b] for b in BINS[t:]}})
            bins.update({b: fresh[b] for b in BINS[t:]})
        step_forget = bins[name]
        gone = set(done) | set(step_forget)
        retain = [i for i in data.ids if i not in gone]
        step = unlearn(clf, result.state, data, step_forget, retain, schedule[name], seed=seed + t)
        result.state = step.state
        result.steps.append(RUMStep(name, list(step_forget), len(retain), step))
        result.bins[name] = list(step_forget)
        done += step_forget
    result.seconds = time.perf_counter() - t0
    return result


def run_vanilla(clf: MonolithicClassifier, state: State, data: LabeledTrunk, forget_ids: Sequence[str],
                mcfg: MethodConfig, seed: int = 0) -> UnlearnResult:
    """The control without refinement: one method on all of F at once, retain = D \\ F."""
    gone = set(forget_ids)
    return unlearn(clf, state, data, list(forget_ids), [i for i in data.ids if i not in gone], mcfg, seed=seed)

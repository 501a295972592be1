"""The computation of memorization-aware approximate unlearning, free of files: service.py runs it for both doors.

train_original   -> the monolithic model and its logged proxies (running means over its training epochs)
memorization_scores -> one table per training id: the proxies, holdout retraining, and optionally the
                    S3T-inventory estimate and the subsampled true score
plan_variants    -> which models a requested method means (the method, its controls, the oracle)
run_unlearning   -> oracle, vanilla, RUM^F, full RUM and shuffle controls, each scored against the oracle
The steps are those of docs/memorization.md ("## Proxies", "## RUM", "## Metrics"). Everything here
is approximate unlearning (labelled so in the report); S3T itself is the exact path. What is kept in
the state's storage, and its erasure, is store.py's.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from s3t_ops.memorization import metrics, proxies, rum, scores
from s3t_ops.memorization.config import METHODS, UNLEARN_METHODS, MemorizationConfig, MethodConfig, default_method
from s3t_ops.memorization.methods import oracle
from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State, TrainResult, train_classifier
from s3t_ops.trunk import TrunkCache, compute_trunk

if TYPE_CHECKING:
    from s3t_ops.backbone import Backbone
    from s3t_ops.engine import S3T

VARIANTS = ("original", "oracle", "vanilla", "rum_f", "rum_f_shuffle", "rum", "rum_shuffle")
SINGLE_METHODS = tuple(m for m in METHODS if m != "none")


@dataclass
class Splits:
    train: LabeledTrunk
    val: LabeledTrunk
    test: LabeledTrunk
    label_names: list[str] = field(default_factory=list)


def splits_from_engine(engine: "S3T") -> Splits:
    """The live data of an S3T state (its cached trunk; missing caches are computed first)."""
    engine.build_trunk()
    train = engine.ledger.examples("train")
    cells = sorted({(int(s), int(j)) for s, j in zip(train["shard"], train["slice"])})
    trunk = TrunkCache.concat([engine.slice_trunk(s, j) for s, j in cells])
    val, test = engine.trunk("val.safetensors"), engine.trunk("test.safetensors")
    return Splits(LabeledTrunk(trunk, engine.labels(trunk.ids)), LabeledTrunk(val, engine.labels(val.ids)),
                  LabeledTrunk(test, engine.labels(test.ids)), list(engine.label_names))


def splits_from_frame(backbone: "Backbone", frame: pd.DataFrame, label_names: Sequence[str] = ()) -> Splits:
    """Splits from a Dataset frame (columns id, text, label, split): one frozen trunk pass per example."""
    out = {}
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        trunk = compute_trunk(backbone, part["id"].tolist(), part["text"].tolist())
        out[split] = LabeledTrunk(trunk, torch.tensor(part["label"].astype(int).tolist(), dtype=torch.long))
    return Splits(out["train"], out["val"], out["test"], list(label_names))


def classifier_for(backbone: "Backbone", num_labels: int, mcfg: MemorizationConfig) -> MonolithicClassifier:
    mcfg.check_groups(backbone.layout.groups)
    return MonolithicClassifier(backbone, num_labels, mcfg.depth)


@dataclass
class OriginalModel:
    state: State
    proxies: pd.DataFrame  # per id: confidence, max_confidence, neg_entropy, binary_accuracy, n_obs
    training: TrainResult


def original_parts(original: OriginalModel) -> tuple[dict, pd.DataFrame, dict[str, Any]]:
    """An original model as its artifact keeps it (artifacts.save_original): state, proxies, the training's counts."""
    t = original.training
    return original.state, original.proxies, {"epoch_losses": t.epoch_losses, "steps": t.steps, "grad_example_steps": t.grad_example_steps,
                                              "seconds": t.seconds, "seen_ids": sorted(t.seen_ids)}


def original_from(parts: tuple[dict, pd.DataFrame, dict[str, Any]] | None) -> OriginalModel | None:
    """The inverse of `original_parts` (None stays None: nothing cached)."""
    if parts is None:
        return None
    state, proxies, info = parts
    info = dict(info)
    training = TrainResult(state=state, seen_ids=set(info.pop("seen_ids")), **info)
    return OriginalModel(state, proxies, training)


def train_original(clf: MonolithicClassifier, splits: Splits, mcfg: MemorizationConfig) -> OriginalModel:
    """Train on all of D, logging the four step proxies from the training logits themselves."""
    tracker = proxies.ProxyTracker()
    result = train_classifier(clf, splits.train, mcfg.epochs, mcfg.lr, mcfg.batch_size, mcfg.seed, on_logits=tracker)
    return OriginalModel(result.state, tracker.means(), result)


def memorization_scores(
    clf: MonolithicClassifier,
    splits: Splits,
    original: OriginalModel,
    mcfg: MemorizationConfig,
    holdout: bool = True,
    subsampled: bool = False,
    inventory: pd.DataFrame | None = None,
    seconds: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per training id: the step proxies, `holdout_retraining`, and optionally the S3T inventory
    estimate (`inventory`: the table of `scores.inventory_scores`, free given trained checkpoints, so
    computed once by the caller) and the subsampled true score (`memorization`, costly:
    `subsample_models` trainings). `seconds`, when given, receives the time each costly column took."""
    table = original.proxies.reindex(splits.train.ids)
    table.index.name = "id"
    timings = {} if seconds is None else seconds
    if holdout:
        t = time.perf_counter()
        table["holdout_retraining"] = proxies.holdout_retraining(
            clf, original.state, splits.val, splits.train, lr=mcfg.holdout_lr, max_epochs=mcfg.holdout_max_epochs,
            patience=mcfg.holdout_patience, batch_size=mcfg.batch_size, seed=mcfg.seed)
        timings["holdout_retraining"] = time.perf_counter() - t
    if inventory is not None:
        table["inventory"] = inventory["memorization"].reindex(table.index)
    if subsampled:
        t = time.perf_counter()
        true = scores.subsampled_memorization(clf, splits.train, mcfg.subsample_models, mcfg.subsample_fraction,
                                              mcfg.epochs, mcfg.lr, mcfg.batch_size, mcfg.seed)
        table["memorization"] = true["memorization"]
        timings["memorization"] = time.perf_counter() - t
    return table


def proxy_agreement(table: pd.DataFrame, truth: str = "memorization") -> dict[str, float]:
    """Spearman correlation of each oriented proxy with a true score column of `memorization_scores`."""
    out = {}
    for name in [c for c in table.columns if c in proxies.DIRECTION and c != truth]:
        out[name] = scores.rank_correlation(proxies.memorization_score(table[name], name), table[truth])
    return out


def ids_digest(ids: Iterable[str]) -> str:
    """Names a set of ids (order-free) in MLflow params and model metadata without listing them."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def data_ids(splits: Splits, val: bool = False, test: bool = False) -> list[str]:
    """Every example id a result was computed from: the training set, and the held-out splits it read
    (validation: the holdout-retraining proxy fine-tunes on it; test: accuracies and the MIA)."""
    return [*splits.train.ids, *(splits.val.ids if val else ()), *(splits.test.ids if test else ())]


def select_forget_set(ids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """n training ids chosen by a hash of (seed, id): deterministic and independent of row order."""
    if not 0 < n < len(ids):
        raise ValueError(f"the forget set must hold between 1 and {len(ids) - 1} examples, got {n}")
    return sorted(ids, key=lambda i: hashlib.sha256(f"forget|{seed}|{i}".encode()).hexdigest())[:n]


def select_mixed_forget_set(mem: pd.Series, n: int) -> list[str]:
    """The papers' "mix" forget set: n/3 most memorized, n/3 closest to the median, n/3 least memorized
    training examples (mem: higher = more memorized, e.g. the subsampled true score or an oriented proxy)."""
    mem = mem.dropna()
    if not 3 <= n <= len(mem):
        raise ValueError(f"the mixed forget set needs 3..{len(mem)} examples, got {n}")
    k = n // 3
    ranked = [i for _, i in sorted(zip(mem.to_numpy(dtype=float), mem.index))]
    low, high = ranked[:k], ranked[len(ranked) - k:]
    median = float(mem.median())
    taken = set(low) | set(high)
    mid = [i for _, i in sorted((abs(float(mem[i]) - median), i) for i in ranked if i not in taken)][: n - 2 * k]
    return low + mid + high


@dataclass
class UnlearningReport:
    """Per variant: accuracy on forget / retain / test, MIA, and (except the oracle) ToW, ToW-MIA and the gaps."""

    proxy: str
    forget_ids: list[str]
    n_train: int
    config: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    states: dict[str, State] = field(default_factory=dict, repr=False)  # the models themselves, by variant
    unscored: int = 0  # forget examples without a score (NaN), ranked at the median

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no tensors); `approximate` is always true: this is not exact unlearning."""
        return {"approximate": True, "proxy": self.proxy, "n_forget": len(self.forget_ids), "n_train": self.n_train,
                "unscored": self.unscored, "forget_ids": list(self.forget_ids), "config": self.config, "variants": self.variants}


@dataclass
class VariantResult:
    """One unlearned model (before evaluation): its state and what it cost."""

    state: State
    seconds: float
    grad_example_steps: int
    extra: dict[str, Any] = field(default_factory=dict)  # method, per-step summary, bin sizes


def refinement(clf: MonolithicClassifier, splits: Splits, forget_ids: Sequence[str], score_table: pd.DataFrame,
               mcfg: MemorizationConfig) -> tuple[pd.Series, int, Callable[[State, list[str]], pd.Series] | None]:
    """What RUM ranks the forget set by: (memorization per training id, how many forget ids had no score, rescore).

    The column `mcfg.proxy` of `score_table`, oriented so that higher = more memorized; forget examples it
    leaves NaN are ranked at the median. With holdout_retraining, `rescore` recomputes the proxy on the
    current model after every RUM step."""
    if mcfg.proxy not in score_table.columns:
        raise ValueError(f"the score table has no column {mcfg.proxy!r} (it has {', '.join(map(str, score_table.columns))})")
    mem = proxies.memorization_score(score_table[mcfg.proxy], mcfg.proxy).reindex(splits.train.ids)
    unscored = int(mem.reindex(list(forget_ids)).isna().sum())
    if unscored:  # e.g. the inventory has no model that saw a slice whose stages await retraining
        mem = mem.fillna(float(mem.median()))
    rescore = None
    if mcfg.proxy == "holdout_retraining":
        def rescore(state: State, remaining: list[str]) -> pd.Series:
            return proxies.holdout_retraining(clf, state, splits.val, splits.train, lr=mcfg.holdout_lr, max_epochs=mcfg.holdout_max_epochs,
                                              patience=mcfg.holdout_patience, batch_size=mcfg.batch_size, seed=mcfg.seed, ids=remaining)
    return mem, unscored, rescore


def run_variant(
    clf: MonolithicClassifier,
    splits: Splits,
    original: State,
    forget_ids: Sequence[str],
    name: str,
    mcfg: MemorizationConfig,
    mem: pd.Series | None = None,
    vanilla: MethodConfig | None = None,
    rescore: Callable[[State, list[str]], pd.Series] | None = None,
) -> VariantResult:
    """One unlearned model: `original` (unchanged), `vanilla` (one method on all of F; default `mcfg.vanilla`,
    the tuned NegGrad+), `rum_f` / `rum` (sequential over bins of `mem`) or their `_shuffle` controls."""
    forget_ids = list(forget_ids)
    if name == "original":
        return VariantResult(original, 0.0, 0, {"method": "none"})
    if name == "vanilla":
        v = rum.run_vanilla(clf, original, splits.train, forget_ids, vanilla or mcfg.vanilla, seed=mcfg.seed)
        return VariantResult(v.state, v.seconds, v.grad_example_steps, {"method": v.method})
    base, shuffled = name.removesuffix("_shuffle"), name.endswith("_shuffle")
    if base not in ("rum_f", "rum"):
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(v for v in VARIANTS if v != 'oracle')}")
    if mem is None:
        raise ValueError(f"variant {name!r} needs memorization scores to split the forget set")
    schedule = mcfg.rum_f if base == "rum_f" else mcfg.rum
    res = rum.run_rum(clf, original, splits.train, forget_ids, mem, schedule, seed=mcfg.seed, shuffle=shuffled, rescore=rescore)
    method = "+".join(schedule[b].method for b in ("low", "mid", "high"))
    return VariantResult(res.state, res.seconds, res.grad_example_steps,
                         {"method": method, "steps": res.summary(), "bins": {b: len(v) for b, v in res.bins.items()}})


def run_unlearning(
    clf: MonolithicClassifier,
    splits: Splits,
    original: State,
    forget_ids: Sequence[str],
    score_table: pd.DataFrame,
    mcfg: MemorizationConfig,
    variants: Sequence[str] = VARIANTS,
    vanilla: MethodConfig | None = None,
    progress: Callable[[str], None] | None = None,
    given: dict[str, VariantResult] | None = None,
) -> UnlearningReport:
    """Every requested variant, evaluated (accuracy F/R/T, MIA) and scored against the oracle (ToW, ToW-MIA).

    The forget set is refined by `mcfg.proxy` (a column of `score_table`; forget examples it leaves
    NaN are ranked at the median); with holdout_retraining the proxy is recomputed on the current
    model after every RUM step. vanilla: the method applied to all of F at once (default: `mcfg.vanilla`). Without "oracle" in `variants` no model is retrained and nothing is scored
    (accuracies and MIA only). progress(phase) is called as each phase starts (see `phases`).
    given: variants already computed (e.g. by an upstream Dagster asset), evaluated as they are.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    note = progress or (lambda phase: None)
    forget_ids = list(dict.fromkeys(forget_ids))
    train, test = splits.train, splits.test
    needs_mem = any(v.startswith("rum") and v not in (given or {}) for v in variants)
    mem, unscored, rescore = refinement(clf, splits, forget_ids, score_table, mcfg) if needs_mem else (None, 0, None)
    rows: dict[str, dict[str, Any]] = {}
    states: dict[str, State] = {}
    oracle_eval = None
    if "oracle" in variants:
        note("oracle")
        t0 = time.perf_counter()
        ref = oracle(clf, train, forget_ids, mcfg.epochs, mcfg.lr, mcfg.batch_size, mcfg.seed)
        oracle_eval = metrics.evaluate(clf, ref.state, train, forget_ids, test, seed=mcfg.seed)
        rows["oracle"] = {**oracle_eval.to_dict(), "seconds": time.perf_counter() - t0, "grad_example_steps": ref.grad_example_steps,
                          "method": "retrain"}
        states["oracle"] = ref.state
    for name in [v for v in VARIANTS if v in variants and v != "oracle"]:
        note(name)
        res = (given or {}).get(name) or run_variant(clf, splits, original, forget_ids, name, mcfg, mem, vanilla, rescore)
        ev = metrics.evaluate(clf, res.state, train, forget_ids, test, seed=mcfg.seed)
        scored = metrics.compare(ev, oracle_eval) if oracle_eval is not None else {}
        rows[name] = {**ev.to_dict(), **scored, "seconds": res.seconds, "grad_example_steps": res.grad_example_steps, **res.extra}
        states[name] = res.state
    return UnlearningReport(mcfg.proxy, forget_ids, len(train), mcfg.to_dict(), rows, states, unscored)


def phases(variants: Sequence[str]) -> list[str]:
    """The phases `run_unlearning` reports to its progress callback, in order."""
    return (["oracle"] if "oracle" in variants else []) + [v for v in VARIANTS if v in variants and v != "oracle"]


def plan_variants(method: str, controls: bool = False, with_oracle: bool = True) -> tuple[list[str], str, MethodConfig | None]:
    """(variants to run, the variant that is the requested method, the vanilla MethodConfig or None).

    rum / rum_f: RUM or RUM^F; controls add its shuffle control and vanilla NegGrad+. vanilla: the tuned
    NegGrad+ step (`MemorizationConfig.vanilla`) on all of F. A single method (e.g. salun): that method on all of F, with its
    default settings (`config.default_method`). `original` (doing nothing) is always scored as a baseline.
    """
    if method not in UNLEARN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(UNLEARN_METHODS)}")
    variants = ["original"] + (["oracle"] if with_oracle else [])
    vanilla = None
    if method in ("rum", "rum_f"):
        variants.append(method)
        if controls:
            variants += [f"{method}_shuffle", "vanilla"]
        primary = method
    else:
        variants.append("vanilla")
        primary = "vanilla"
        vanilla = None if method == "vanilla" else default_method(method)
    return variants, primary, vanilla


def label(variant: str, method: str) -> str:
    """How the report names a variant (a single method runs as the `vanilla` variant)."""
    return method if variant == "vanilla" and method in SINGLE_METHODS else variant


def labelled(report: dict[str, Any], method: str) -> dict[str, Any]:
    """`UnlearningReport.to_dict()` with its variants named as the report shows them (`label`)."""
    return {**report, "variants": {label(v, method): row for v, row in report["variants"].items()}}


def check_forget_ids(splits: Splits, forget_ids: Sequence[str]) -> list[str]:
    """The forget ids, deduplicated in order; KeyError naming those that are not live training examples."""
    forget = list(dict.fromkeys(str(i) for i in forget_ids))
    if not forget:
        raise ValueError("the forget set is empty")
    live = set(splits.train.ids)
    unknown = [i for i in forget if i not in live]
    if unknown:
        raise KeyError(f"{len(unknown)} id(s) are not live training examples (unknown, in val/test, or already forgotten "
                       f"exactly by S3T), e.g. {unknown[:3]}")
    if len(forget) >= len(live):
        raise ValueError(f"the forget set ({len(forget)}) must leave some of the {len(live)} training examples to retain")
    return forget

"""The memorization flow that both doors (a CLI `s3t unlearn` and Dagster assets) call.

train_original   -> the monolithic model and its logged proxies (running means over its training epochs)
memorization_scores -> one table per training id: the proxies, holdout retraining, and optionally the
                    subsampled true score and the S3T-inventory estimate
run_unlearning   -> oracle, vanilla, RUM^F, full RUM and shuffle controls, each scored against the oracle
Everything here is approximate unlearning (labelled so in the report); S3T itself is the exact path.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from s3t_ops.memorization import metrics, proxies, rum, scores
from s3t_ops.memorization.config import MemorizationConfig, MethodConfig
from s3t_ops.memorization.methods import oracle
from s3t_ops.memorization.model import LabeledTrunk, MonolithicClassifier, State, TrainResult, train_classifier
from s3t_ops.trunk import TrunkCache, compute_trunk

if TYPE_CHECKING:
    from s3t_ops.backbone import Backbone
    from s3t_ops.engine import S3T

VARIANTS = ("original", "oracle", "vanilla", "rum_f", "rum_f_shuffle", "rum", "rum_shuffle")


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
    return Splits(LabeledTrunk(trunk, engine._labels(trunk.ids)), LabeledTrunk(val, engine._labels(val.ids)),
                  LabeledTrunk(test, engine._labels(test.ids)), list(engine.label_names))


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

    def save(self, folder: str | Path) -> Path:
        """model.safetensors + proxies.parquet + training.json (atomic per file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / "model.safetensors", self.state)
        tmp = folder / "proxies.tmp"
        self.proxies.to_parquet(tmp)
        os.replace(tmp, folder / "proxies.parquet")
        info = {"epoch_losses": self.training.epoch_losses, "steps": self.training.steps,
                "grad_example_steps": self.training.grad_example_steps, "seconds": self.training.seconds,
                "seen_ids": sorted(self.training.seen_ids)}
        tmp = folder / "training.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, folder / "training.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "OriginalModel":
        folder = Path(folder)
        info = json.loads((folder / "training.json").read_text())
        training = TrainResult(state={}, seen_ids=set(info.pop("seen_ids")), **info)
        training.state = load_state(folder / "model.safetensors")
        return cls(training.state, pd.read_parquet(folder / "proxies.parquet"), training)


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
    engine: "S3T | None" = None,
) -> pd.DataFrame:
    """One row per training id: the step proxies, `holdout_retraining`, and optionally the subsampled
    true score (`memorization`, costly: `subsample_models` trainings) and the S3T inventory estimate
    (`inventory`, free given an engine with trained checkpoints)."""
    table = original.proxies.reindex(splits.train.ids)
    if holdout:
        table["holdout_retraining"] = proxies.holdout_retraining(
            clf, original.state, splits.val, splits.train, lr=mcfg.holdout_lr, max_epochs=mcfg.holdout_max_epochs,
            patience=mcfg.holdout_patience, batch_size=mcfg.batch_size, seed=mcfg.seed)
    if subsampled:
        true = scores.subsampled_memorization(clf, splits.train, mcfg.subsample_models, mcfg.subsample_fraction,
                                              mcfg.epochs, mcfg.lr, mcfg.batch_size, mcfg.seed)
        table["memorization"] = true["memorization"]
    if engine is not None:
        table["inventory"] = scores.inventory_scores(engine)["memorization"]
    table.index.name = "id"
    return table


def proxy_agreement(table: pd.DataFrame, truth: str = "memorization") -> dict[str, float]:
    """Spearman correlation of each oriented proxy with a true score column of `memorization_scores`."""
    out = {}
    for name in [c for c in table.columns if c in proxies.DIRECTION and c != truth]:
        out[name] = scores.rank_correlation(proxies.memorization_score(table[name], name), table[truth])
    return out


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


def original_folder(state_dir: str | Path, splits: Splits, mcfg: MemorizationConfig) -> Path:
    """Where the original model of this config and live training set is cached in a state folder."""
    key = hashlib.sha256(json.dumps({k: v for k, v in mcfg.to_dict().items() if k in ("depth", "epochs", "lr", "batch_size", "seed")},
                                    sort_keys=True).encode() + "|".join(splits.train.ids).encode()).hexdigest()[:12]
    return Path(state_dir) / "memorization" / f"original-{key}"


def load_or_train_original(clf: MonolithicClassifier, splits: Splits, mcfg: MemorizationConfig, state_dir: str | Path,
                           retrain: bool = False) -> tuple[OriginalModel, Path, bool]:
    """(the original model, its folder, whether it was loaded from the cache)."""
    folder = original_folder(state_dir, splits, mcfg)
    if (folder / "training.json").is_file() and not retrain:
        return OriginalModel.load(folder), folder, True
    original = train_original(clf, splits, mcfg)
    original.save(folder)
    return original, folder, False


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


def unlearn_state(
    state_dir: str | Path,
    forget_ids: Sequence[str] | None = None,
    n_forget: int = 30,
    mcfg: MemorizationConfig | None = None,
    variants: Sequence[str] = VARIANTS,
    retrain: bool = False,
    holdout: bool = True,
    inventory: bool = True,
    vanilla: MethodConfig | None = None,
    progress: Callable[[str], None] | None = None,
    engine: "S3T | None" = None,
    splits: Splits | None = None,
    inventory_table: pd.DataFrame | None = None,
) -> UnlearningReport:
    """One call for `s3t unlearn`: approximate unlearning of a monolithic model on an S3T state's live data.

    The original model and its proxies are cached under `<state>/memorization/original-<hash of mcfg>/`
    (retrain=True rebuilds them). forget_ids default: `n_forget` training ids chosen by a seeded hash.
    The forget ids must be live training examples (ids already deleted from S3T are gone from the data).
    engine / splits / inventory_table: reuse what a caller already has (e.g. over several seeds).
    progress(phase): "original", "scores", then `phases(variants)`.
    """
    from s3t_ops.engine import S3T

    mcfg = mcfg or MemorizationConfig()
    note = progress or (lambda phase: None)
    if mcfg.proxy == "memorization":
        raise ValueError("proxy 'memorization' needs the subsampled true score; use run_unlearning with memorization_scores(subsampled=True)")
    engine = engine or S3T.open(state_dir, progress=False)
    splits = splits or splits_from_engine(engine)
    forget = check_forget_ids(splits, forget_ids) if forget_ids is not None else select_forget_set(splits.train.ids, n_forget, mcfg.seed)
    clf = classifier_for(engine.backbone, len(splits.label_names), mcfg)
    note("original")
    original, _, _ = load_or_train_original(clf, splits, mcfg, state_dir, retrain)
    note("scores")
    want_inventory = inventory or mcfg.proxy == "inventory"
    table = memorization_scores(clf, splits, original, mcfg, holdout=holdout or mcfg.proxy == "holdout_retraining",
                                engine=engine if want_inventory and inventory_table is None else None)
    if want_inventory and inventory_table is not None:
        table["inventory"] = inventory_table["memorization"].reindex(table.index)
    return run_unlearning(clf, splits, original.state, forget, table, mcfg, variants, vanilla=vanilla, progress=progress)


# --- persistence (assets hand states to each other as files) --------------------------------
def save_state(path: str | Path, state: State, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"meta": json.dumps(metadata or {}, default=str)})
    os.replace(tmp, path)
    return path


def load_state(path: str | Path) -> State:
    from safetensors.torch import load_file

    return load_file(str(path))

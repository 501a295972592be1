"""True memorization scores, to validate the cheap proxies (docs/memorization.md, "## True score and inventory estimate").

mem(i) = P[h(x_i) = y_i | i in train] - P[h(x_i) = y_i | i not in train]   (Feldman)

Two estimators of the same difference of mean correctness:
- subsampling: train many models on random 70% subsets; average correctness over the models whose
  subset held i minus over those whose subset did not (`subsample_masks`, `memorization_from_runs`,
  `subsampled_memorization`);
- the S3T inventory: stage checkpoints already are models that did and did not see each example
  (other shards; prefixes without its slice), so the estimate costs inference only
  (`inventory_memorization`, `inventory_scores`). Checkpoints differ in depth (a depth-k model has k
  trained groups and saw k slices), so by default the difference is taken within each depth and
  averaged over the depths where both kinds of model exist.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, train_classifier

if TYPE_CHECKING:  # the engine imports heavy modules; only the inventory needs it
    from s3t_ops.engine import S3T


def subsample_masks(n: int, n_models: int, fraction: float = 0.7, seed: int = 0) -> np.ndarray:
    """[n_models, n] booleans: model k trains on exactly round(fraction * n) examples drawn without replacement."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = int(round(fraction * n))
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_models, n), dtype=bool)
    for k in range(n_models):
        masks[k, rng.choice(n, size=size, replace=False)] = True
    return masks


def memorization_from_runs(in_mask: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """mean(correct | in) - mean(correct | out) per example (column); NaN where either side has no model."""
    in_mask = np.asarray(in_mask, dtype=bool)
    correct = np.asarray(correct, dtype=float)
    if in_mask.shape != correct.shape:
        raise ValueError(f"in_mask {in_mask.shape} and correct {correct.shape} differ in shape")
    n_in = in_mask.sum(0)
    n_out = (~in_mask).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = np.where(in_mask, correct, 0.0).sum(0) / n_in
        p_out = np.where(~in_mask, correct, 0.0).sum(0) / n_out
    out = p_in - p_out
    out[(n_in == 0) | (n_out == 0)] = np.nan
    return out


def subsampled_memorization(
    clf: MonolithicClassifier,
    train: LabeledTrunk,
    n_models: int = 16,
    fraction: float = 0.7,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> pd.DataFrame:
    """The subsampled estimator: `n_models` fresh models, each on a random `fraction` of `train`.

    Returns one row per id: `memorization`, `n_in`, `n_out` (models that did / did not train on it).
    """
    ids = train.ids
    masks = subsample_masks(len(ids), n_models, fraction, seed)
    correct = np.zeros(masks.shape, dtype=bool)
    for k in range(n_models):
        subset = [ids[j] for j in np.flatnonzero(masks[k])]
        result = train_classifier(clf, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed * 100_003 + k + 1, ids=subset)
        logits = clf.logits(result.state, train)
        correct[k] = (logits.argmax(-1) == train.labels).numpy()
    mem = memorization_from_runs(masks, correct)
    return pd.DataFrame({"memorization": mem, "n_in": masks.sum(0), "n_out": (~masks).sum(0)}, index=pd.Index(ids, name="id"))


def inventory_memorization(correct: np.ndarray, seen: np.ndarray, depth: Sequence[int] | None = None) -> np.ndarray:
    """Memorization from an inventory of K models ([K, N] correctness and seen-flags).

    depth=None: one pooled difference over all models. With a depth per model: the difference within
    each depth, averaged over the depths where the example has both a model that saw it and one that
    did not (NaN if there is none).
    """
    correct = np.asarray(correct, dtype=float)
    seen = np.asarray(seen, dtype=bool)
    if depth is None:
        return memorization_from_runs(seen, correct)
    depth = np.asarray(depth)
    if len(depth) != len(seen):
        raise ValueError(f"{len(depth)} depths for {len(seen)} models")
    diffs = np.stack([memorization_from_runs(seen[depth == d], correct[depth == d]) for d in np.unique(depth)])
    valid = ~np.isnan(diffs)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(valid, diffs, 0.0).sum(0) / valid.sum(0)
    out[valid.sum(0) == 0] = np.nan
    return out


def inventory_scores(engine: "S3T", stratify: bool = True, batch_size: int = 256) -> pd.DataFrame:
    """Memorization of every live training example from the S3T checkpoint inventory (inference only).

    Every live stage checkpoint is a depth-k model (its chain of k stages); the ledger's lineage says
    exactly which examples it saw. Returns one row per id: `memorization`, `n_in`, `n_out`.
    """
    from s3t_ops.checkpoints import split_state
    from s3t_ops.stages import depth_logits, load_prefix
    from s3t_ops.trunk import TrunkCache

    train = engine.ledger.examples("train")
    trunks = [engine.slice_trunk(int(s), int(j)) for s, j in train[["shard", "slice"]].drop_duplicates().itertuples(index=False)]
    trunk = TrunkCache.concat(trunks)
    ids = trunk.ids
    labels = engine.labels(ids)
    rows = torch.arange(len(ids))
    tombs = engine.ledger.keyring.tombstones(ids)
    frame = engine.ledger.checkpoints().astype(object)
    frame = frame.where(frame.notna(), None)
    live = {r["key"]: r for r in frame.to_dict("records") if engine.checkpoints.intact(r["key"], r["sha256"])}
    backbone = engine.backbone
    correct, seen, depth = [], [], []
    for key, row in live.items():
        chain, k = [], key
        while k is not None and k in live:
            chain.append(k)
            k = live[k]["parent_key"]
        if len(chain) != int(row["stage"]):
            continue  # an ancestor was purged: this checkpoint cannot be run
        states = [engine.checkpoints.load(c, live[c]["sha256"]) for c in reversed(chain)]
        span = engine.cfg.active_groups(len(states))
        load_prefix(backbone, states)
        backbone.activate(span)
        head = torch.nn.Linear(backbone.hidden_size, len(engine.label_names))
        head.load_state_dict(split_state(states[-1])[1])
        head.eval()
        logits = depth_logits(backbone, head, trunk, rows, span, batch_size)
        correct.append((logits.argmax(-1) == labels).numpy())
        lineage = engine.ledger.lineage(key)  # keyed tombstones of the examples it saw
        seen.append(np.array([t in lineage for t in tombs]))
        depth.append(len(states))
    if not correct:
        raise RuntimeError("no live stage checkpoint to estimate memorization from; train the S3T model first")
    correct_a, seen_a = np.stack(correct), np.stack(seen)
    mem = inventory_memorization(correct_a, seen_a, depth if stratify else None)
    return pd.DataFrame({"memorization": mem, "n_in": seen_a.sum(0), "n_out": (~seen_a).sum(0)}, index=pd.Index(ids, name="id"))


def rank_correlation(a: pd.Series, b: pd.Series) -> float:
    """Spearman correlation over the ids both series score (NaNs dropped): how well a proxy ranks like the truth."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if len(joined) < 2:
        return float("nan")
    return float(joined["a"].rank().corr(joined["b"].rank()))

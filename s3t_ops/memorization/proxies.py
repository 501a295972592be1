"""Cheap memorization proxies (docs/memorization.md, "## Proxies").

(a)-(d) are running means over training epochs of quantities computed from the logits of the
training steps themselves (no extra forward pass), per example:
  confidence       p_y = softmax(z)[y]                  (high => low memorization)
  max_confidence   max_c softmax(z)[c]                  (high => low memorization)
  neg_entropy      sum_c p_c log p_c  (0 log 0 = 0)     (high => low memorization)
  binary_accuracy  1[argmax z = y]                      (high => low memorization)
(e) holdout_retraining: fine-tune a copy of the final model on held-out data (early stop after
`patience` epochs without improvement), score each training example by the symmetric KL between the
two models' predictions (high => high memorization). It only needs the current model, so it can be
recomputed after every unlearning step.

`memorization_score` turns any proxy into "higher = more memorized" so ranks are comparable.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State, train_classifier

STEP_PROXIES = ("confidence", "max_confidence", "neg_entropy", "binary_accuracy")
# +1: the proxy grows with memorization; -1: it shrinks (docs/memorization.md, "## Proxies": "high => low memorization").
# The true-score columns (`inventory`, `memorization`) already grow with memorization.
DIRECTION = {"confidence": -1.0, "max_confidence": -1.0, "neg_entropy": -1.0, "binary_accuracy": -1.0, "holdout_retraining": 1.0,
             "inventory": 1.0, "memorization": 1.0}


def step_proxies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example values of the four logit proxies for one step ([B, C] logits, [B] labels)."""
    logits = logits.detach().float()
    p = torch.softmax(logits, dim=-1)
    labels = labels.long()
    return {
        "confidence": p.gather(1, labels[:, None]).squeeze(1),
        "max_confidence": p.max(dim=-1).values,
        "neg_entropy": torch.special.xlogy(p, p).sum(dim=-1),
        "binary_accuracy": (logits.argmax(dim=-1) == labels).float(),
    }


class ProxyTracker:
    """Running means of the step proxies per example id, fed by `train_classifier(on_logits=...)`."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def __call__(self, ids: Sequence[str], logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.update(ids, logits, labels)

    def update(self, ids: Sequence[str], logits: torch.Tensor, labels: torch.Tensor) -> None:
        if len(ids) != len(logits):
            raise ValueError(f"{len(ids)} ids but {len(logits)} logit rows")
        values = step_proxies(logits, labels)
        stacked = torch.stack([values[name] for name in STEP_PROXIES], dim=1).double().numpy()
        for i, row in zip(ids, stacked):
            if i in self._sums:
                self._sums[i] += row
                self._counts[i] += 1
            else:
                self._sums[i] = row.copy()
                self._counts[i] = 1

    @property
    def ids(self) -> list[str]:
        return list(self._sums)

    def means(self) -> pd.DataFrame:
        """One row per seen id (index `id`): the running mean of each proxy and `n_obs` (steps seen)."""
        ids = sorted(self._sums)
        if not ids:
            return pd.DataFrame(columns=[*STEP_PROXIES, "n_obs"], index=pd.Index([], name="id"))
        arr = np.stack([self._sums[i] / self._counts[i] for i in ids])
        frame = pd.DataFrame(arr, columns=list(STEP_PROXIES), index=pd.Index(ids, name="id"))
        frame["n_obs"] = [self._counts[i] for i in ids]
        return frame


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 per row, probabilities clamped at `eps` (as the reference code does)."""
    p = torch.softmax(p_logits.double(), dim=-1).clamp(min=eps)
    q = torch.softmax(q_logits.double(), dim=-1).clamp(min=eps)
    lp, lq = p.log(), q.log()
    return (((p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)) / 2).float()


def holdout_retraining(
    clf: MonolithicClassifier,
    state: State,
    heldout: LabeledTrunk,
    train: LabeledTrunk,
    lr: float = 1e-3,
    max_epochs: int = 20,
    patience: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> pd.Series:
    """Proxy (e): symmetric KL between `state` and a copy fine-tuned on `heldout`, per training id.

    `heldout` must be data the model never trained on (the validation split by default in the
    workflow, so test accuracy stays untouched). Returns a Series indexed by id (default: all of `train`).
    """
    tuned = train_classifier(clf, heldout, epochs=max_epochs, lr=lr, batch_size=batch_size, seed=seed, init=state, patience=patience)
    ids = list(train.ids if ids is None else ids)
    rows = train.rows(ids)
    before = clf.logits(state, train, rows)
    after = clf.logits(tuned.state, train, rows)
    return pd.Series(symmetric_kl(before, after).numpy(), index=pd.Index(ids, name="id"), name="holdout_retraining")


def memorization_score(values: pd.Series | np.ndarray, proxy: str) -> pd.Series | np.ndarray:
    """Orient a proxy so that higher means more memorized (ranks of all proxies then agree in sign)."""
    if proxy not in DIRECTION:
        raise ValueError(f"unknown proxy {proxy!r}; one of {', '.join(DIRECTION)}")
    return values * DIRECTION[proxy]

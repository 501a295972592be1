"""Unlearning metrics (docs/memorization.md, "## Metrics").

Accuracies on forget / retain / test in [0, 1]; SVC-MIA; and the tug-of-war scores against the oracle r
(retrained from scratch on D \\ F):
  ToW     = (1-|A_F(u)-A_F(r)|)·(1-|A_R(u)-A_R(r)|)·(1-|A_T(u)-A_T(r)|)
  ToW-MIA = (1-|MIA(u)-MIA(r)|)·(1-|A_R(u)-A_R(r)|)·(1-|A_T(u)-A_T(r)|)
MIA = the fraction of forget examples that an RBF SVC (C=3, gamma='auto') on the true-label
confidence, trained on retain (member, 1) vs test (non-member, 0), predicts as non-member.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(-1) == labels).float().mean())


def true_label_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), -1).gather(1, labels.long()[:, None]).squeeze(1).numpy()


def svc_mia(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, balance: bool = True, seed: int = 0) -> float:
    """Fraction of forget examples predicted non-member by an SVC fit on retain (1) vs test (0) confidences.

    balance: use a random subset of retain as large as the test set, as the reference evaluation does
    (it takes as many retain examples as there are test examples), so the classes are balanced.
    """
    retain_conf, test_conf, forget_conf = (np.asarray(a, dtype=float).reshape(-1) for a in (retain_conf, test_conf, forget_conf))
    if len(forget_conf) == 0:
        return float("nan")
    if len(retain_conf) == 0 or len(test_conf) == 0:
        raise ValueError("the MIA needs member (retain) and non-member (test) examples")
    if balance and len(retain_conf) > len(test_conf):
        retain_conf = retain_conf[np.sort(np.random.default_rng(seed).choice(len(retain_conf), len(test_conf), replace=False))]
    from sklearn.svm import SVC

    x = np.concatenate([retain_conf, test_conf]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(retain_conf)), np.zeros(len(test_conf))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return float(1.0 - clf.predict(forget_conf.reshape(-1, 1)).mean())


def tow(u: Mapping[str, float], r: Mapping[str, float]) -> float:
    """Tug-of-war: keys `forget`, `retain`, `test` (accuracies in [0, 1]) of the unlearned u and oracle r."""
    return float(np.prod([1.0 - abs(u[k] - r[k]) for k in ("forget", "retain", "test")]))


def tow_mia(u: Mapping[str, float], r: Mapping[str, float]) -> float:
    """ToW with the forget-accuracy term replaced by the MIA gap: keys `mia`, `retain`, `test`."""
    return float(np.prod([1.0 - abs(u[k] - r[k]) for k in ("mia", "retain", "test")]))


@dataclass
class Evaluation:
    forget: float
    retain: float
    test: float
    mia: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate(clf: MonolithicClassifier, state: State, train: LabeledTrunk, forget_ids: Sequence[str],
             test: LabeledTrunk, seed: int = 0) -> Evaluation:
    """Accuracy on F, R = train \\ F and test, and SVC-MIA on F, for one model state."""
    gone = set(forget_ids)
    retain_ids = [i for i in train.ids if i not in gone]
    f_rows, r_rows = train.rows(list(forget_ids)), train.rows(retain_ids)
    f_logits = clf.logits(state, train, f_rows)
    r_logits = clf.logits(None, train, r_rows)
    t_logits = clf.logits(None, test)
    f_y, r_y = train.labels.index_select(0, f_rows), train.labels.index_select(0, r_rows)
    mia = svc_mia(true_label_confidence(r_logits, r_y), true_label_confidence(t_logits, test.labels),
                  true_label_confidence(f_logits, f_y), seed=seed)
    return Evaluation(accuracy(f_logits, f_y), accuracy(r_logits, r_y), accuracy(t_logits, test.labels), mia)


def compare(u: Evaluation, r: Evaluation) -> dict[str, float]:
    """ToW and ToW-MIA of an unlearned model against the oracle, with the gaps that enter them."""
    ud, rd = u.to_dict(), r.to_dict()
    return {"tow": tow(ud, rd), "tow_mia": tow_mia(ud, rd), **{f"gap_{k}": ud[k] - rd[k] for k in ("forget", "retain", "test", "mia")}}


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean and two-sided Student-t confidence interval over seeds (NaNs dropped; one value: a zero-width interval)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(x.mean())
    if len(x) == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(x))}


SUMMARY_METRICS = ("forget", "retain", "test", "mia", "tow", "tow_mia", "seconds")


def summarize(runs: Sequence[Mapping[str, Mapping[str, float]]], level: float = 0.95) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and metric, `mean_ci` over runs (e.g. seeds); each run maps variant -> metric row."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(k for run in runs for k in run):
        rows = [run[name] for run in runs if name in run]
        out[name] = {m: mean_ci([r[m] for r in rows if m in r], level) for m in SUMMARY_METRICS if any(m in r for r in rows)}
    return out

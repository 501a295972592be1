"""What every unlearning system in the comparison shares: the data view, the cost of a deletion, aggregation.

All systems read the same ingested ledger (examples, labels, shard/slice cells) and the same cached
frozen-backbone hidden states (the S3T trunk), and run on the same `Backbone` object. Each system
loads its own adapter weights before every forward, so sharing the backbone is safe.
"""
from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from s3t_ops.backbone import Backbone
from s3t_ops.config import S3TConfig
from s3t_ops.trunk import TrunkCache

AGGREGATIONS = ("mean", "vote")


@dataclass(frozen=True)
class ForgetCost:
    """What one deletion request cost a system.

    `seconds` and `grad_example_steps` are the cost of *honouring* the request: wall time from the
    request until the system serves a model that never saw the deleted examples, and the examples
    that went through a gradient step in that time (epochs counted). Work a system chooses to do
    after it already honours the request (S3T's retraining policy) is `background_*`.
    """

    seconds: float
    grad_example_steps: int
    background_seconds: float = 0.0
    background_grad_example_steps: int = 0
    retrained: int = 0  # checkpoints / models trained because of this request (honouring + background)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "grad_example_steps": self.grad_example_steps,
                "background_seconds": self.background_seconds,
                "background_grad_example_steps": self.background_grad_example_steps, "retrained": self.retrained,
                **self.details}


@dataclass
class FitReport:
    seconds: float = 0.0
    grad_example_steps: int = 0
    models: int = 0  # checkpoints trained (stages, slice checkpoints or whole models)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "grad_example_steps": self.grad_example_steps, "models": self.models}


class UnlearningSystem(abc.ABC):
    """The small interface the benchmarks drive: fit once, forget ids, evaluate a split.

    A system serves an ensemble of members (a single model is one member); `evaluate` aggregates their
    logits with `aggregation` and scores the result against `eval_labels`. Systems built on
    `SharedData` keep it in `self.data`, which the default `eval_labels` reads.
    """

    name: str = "system"
    aggregation: str = "mean"  # one of AGGREGATIONS

    @abc.abstractmethod
    def fit(self) -> FitReport:
        """Train on all live training data."""

    @abc.abstractmethod
    def forget(self, ids: Iterable[str]) -> ForgetCost:
        """Honour deletion of these training ids; returns what honouring cost."""

    @abc.abstractmethod
    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        """Logits [N, C] of every served ensemble member on a split; empty when nothing can be served."""

    def eval_labels(self, split: str) -> torch.Tensor:
        """Gold labels of a split, row-aligned with `shard_logits`."""
        return self.data.eval_labels(split)

    def evaluate(self, split: str = "test") -> float:
        """Accuracy of the served model on a split; NaN when nothing can be served (every model invalid)."""
        logits = self.shard_logits(split)
        if not logits:
            return float("nan")
        return accuracy(aggregate(list(logits.values()), self.aggregation), self.eval_labels(split))

    def depths(self) -> dict[int, int]:
        """Served depth per ensemble member (stages or slice checkpoints); 0 = dead. Empty if not applicable."""
        return {}

    def live_models(self) -> int:
        """Ensemble members currently served."""
        d = self.depths()
        return sum(1 for v in d.values() if v > 0) if d else 1


@dataclass
class SharedData:
    """One snapshot of the ingested data with its trunk features, read by every baseline.

    `train` holds the trunk rows of every training example that was live at snapshot time; each
    system keeps its own set of live ids, so deletions in one system never leak into another.
    """

    cfg: S3TConfig
    backbone: Backbone
    num_labels: int
    train: TrunkCache
    labels: dict[str, int]
    cells: dict[str, tuple[int, int]]  # id -> (shard, slice)
    evals: dict[str, TrunkCache] = field(default_factory=dict)

    @classmethod
    def from_engine(cls, engine) -> "SharedData":
        """From an S3T engine after `S3T.create` and `build_trunk()`: same ledger, same backbone, same trunk."""
        train = engine.ledger.examples("train")
        cells = {str(i): (int(s), int(j)) for i, s, j in zip(train["id"], train["shard"], train["slice"])}
        every = engine.ledger.examples()
        labels = {str(i): int(y) for i, y in zip(every["id"], every["label"])}
        parts = [engine.slice_trunk(s, j) for s in range(engine.cfg.shards) for j in range(engine.cfg.slices)
                 if (s, j) in set(cells.values())]
        trunk = TrunkCache.concat(parts)
        evals = {split: engine.trunk(f"{split}.safetensors") for split in ("val", "test")}
        return cls(engine.cfg, engine.backbone, len(engine.label_names), trunk, labels, cells, evals)

    @property
    def shards(self) -> int:
        return self.cfg.shards

    @property
    def slices(self) -> int:
        return self.cfg.slices

    def ids_in(self, live: set[str], shard: int | None = None, slices: Iterable[int] | None = None) -> list[str]:
        """Live ids of a shard (and slices), in trunk order: deterministic, independent of deletions elsewhere."""
        wanted = None if slices is None else set(slices)
        out = []
        for i in self.train.ids:
            if i not in live:
                continue
            s, j = self.cells[i]
            if shard is not None and s != shard:
                continue
            if wanted is not None and j not in wanted:
                continue
            out.append(i)
        return out

    def label_tensor(self, ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.labels[i] for i in ids], dtype=torch.long)

    def eval_labels(self, split: str) -> torch.Tensor:
        return self.label_tensor(self.evals[split].ids)

    def take(self, ids: Iterable[str], live: set[str]) -> list[str]:
        """Remove ids from `live`; returns those that were live. Unknown ids are an error, before anything changes."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        unknown = [i for i in ids if i not in self.cells]
        if unknown:
            raise KeyError(f"{len(unknown)} id(s) are not training examples: {unknown[:5]}")
        new = [i for i in ids if i in live]
        live.difference_update(new)
        return new


def derive_seed(base: int, *parts: object) -> int:
    """A seed per (system, shard, step) so baselines never share random streams by accident."""
    return int(hashlib.sha256("|".join(map(str, (base, *parts))).encode()).hexdigest()[:8], 16) % (2**31)


def aggregate(logits: Sequence[torch.Tensor], method: str = "mean") -> torch.Tensor:
    """Ensemble prediction from per-member logits: averaged logits (as S3T) or majority vote.

    Vote ties are broken by the averaged softmax (worth less than one vote), so the result is
    deterministic. Returns predicted labels [N].
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {method!r}")
    if not logits:
        raise ValueError("no ensemble member to aggregate")
    stacked = torch.stack(list(logits))  # [M, N, C]
    if method == "mean":
        return stacked.mean(0).argmax(-1)
    votes = torch.nn.functional.one_hot(stacked.argmax(-1), stacked.shape[-1]).sum(0).float()  # [N, C]
    tie_break = torch.softmax(stacked, -1).mean(0) * 1e-3
    return (votes + tie_break).argmax(-1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if len(labels) else math.nan


class LogitCache:
    """Per-member eval logits, recomputed only when that member's served model changes (its token)."""

    def __init__(self) -> None:
        self._d: dict[tuple[str, Hashable], tuple[Hashable, torch.Tensor]] = {}

    def get(self, split: str, member: Hashable, token: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        hit = self._d.get((split, member))
        if hit is not None and hit[0] == token:
            return hit[1]
        logits = compute()
        self._d[(split, member)] = (token, logits)
        return logits

    def clear(self) -> None:
        self._d.clear()

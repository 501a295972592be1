"""Per-shard LoRA: m independent LoRA models, one per shard (the same shards as S3T), no slices.

A deletion retrains the affected shard's model from scratch on its remaining data; with
`retrain=False` the shard simply drops out of the ensemble. Aggregation as in S3T (averaged logits)
or majority vote.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch

from s3t_ops.baselines.base import AGGREGATIONS, FitReport, ForgetCost, LogitCache, SharedData, UnlearningSystem, derive_seed
from s3t_ops.baselines.full_lora import full_logits, train_full_lora


class PerShardLoRA(UnlearningSystem):
    def __init__(self, data: SharedData, retrain: bool = True, aggregation: str = "mean", name: str | None = None, on_batch=None):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.data = data
        self.retrain = retrain
        self.aggregation = aggregation
        self.name = name or ("per-shard LoRA" + ("" if retrain else " (no retraining)"))
        self.on_batch = on_batch
        self.live: set[str] = set(data.cells)
        self.models: list[dict | None] = [None] * data.shards
        self._version = [0] * data.shards
        self._cache = LogitCache()

    def clone(self, retrain: bool | None = None, name: str | None = None) -> "PerShardLoRA":
        """An independent copy sharing the trained models (one fit serves both retraining policies)."""
        other = copy.copy(self)
        other.retrain = self.retrain if retrain is None else retrain
        other.name = name or ("per-shard LoRA" + ("" if other.retrain else " (no retraining)"))
        other.live = set(self.live)
        other.models = list(self.models)
        other._version = list(self._version)
        other._cache = LogitCache()
        return other

    def _train(self, shard: int) -> int:
        ids = self.data.ids_in(self.live, shard)
        self._version[shard] += 1
        if not ids:
            self.models[shard] = None
            return 0
        res = train_full_lora(self.data.backbone, self.data.train, ids, self.data.label_tensor(ids),
                              derive_seed(self.data.cfg.seed, "per-shard", shard), self.data.num_labels, on_batch=self.on_batch)
        self.models[shard] = res.state
        return res.grad_example_steps

    def fit(self) -> FitReport:
        t0 = time.perf_counter()
        steps = sum(self._train(s) for s in range(self.data.shards))
        return FitReport(time.perf_counter() - t0, steps, self.data.shards)

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        t0 = time.perf_counter()
        new = self.data.take(ids, self.live)
        shards = sorted({self.data.cells[i][0] for i in new})
        steps = 0
        for s in shards:
            if self.retrain:
                steps += self._train(s)
            elif self.models[s] is not None:
                self.models[s] = None
                self._version[s] += 1
        return ForgetCost(time.perf_counter() - t0, steps, retrained=len(shards) if self.retrain else 0)

    def depths(self) -> dict[int, int]:
        return {s: (1 if m is not None else 0) for s, m in enumerate(self.models)}

    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        trunk = self.data.evals[split]
        out = {}
        for s, state in enumerate(self.models):
            if state is not None:
                out[s] = self._cache.get(split, s, self._version[s],
                                         lambda state=state: full_logits(self.data.backbone, state, self.data.num_labels, trunk))
        return out

"""Full retraining: one LoRA model on all training data, retrained from scratch on every deletion batch.

The exact-unlearning gold standard (and the "oracle" of approximate methods): after each request the
served model is the one trained on the remaining data only.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from s3t_ops.baselines.base import FitReport, ForgetCost, LogitCache, SharedData, UnlearningSystem, derive_seed
from s3t_ops.baselines.full_lora import full_logits, train_full_lora


class FullRetrain(UnlearningSystem):
    def __init__(self, data: SharedData, name: str = "full retraining", epochs: int | None = None, on_batch=None):
        self.data = data
        self.name = name
        self.epochs = epochs
        self.on_batch = on_batch
        self.live: set[str] = set(data.cells)
        self.state: dict | None = None
        self._version = 0
        self._cache = LogitCache()

    def _train(self) -> int:
        ids = self.data.ids_in(self.live)
        res = train_full_lora(self.data.backbone, self.data.train, ids, self.data.label_tensor(ids),
                              derive_seed(self.data.cfg.seed, "full"), self.data.num_labels, epochs=self.epochs, on_batch=self.on_batch)
        self.state = res.state
        self._version += 1
        return res.grad_example_steps

    def fit(self) -> FitReport:
        t0 = time.perf_counter()
        steps = self._train()
        return FitReport(time.perf_counter() - t0, steps, 1)

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        t0 = time.perf_counter()
        new = self.data.take(ids, self.live)
        steps = self._train() if new else 0
        return ForgetCost(time.perf_counter() - t0, steps, retrained=1 if new else 0)

    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        """The single model as the only ensemble member (aggregating one member is its argmax)."""
        if self.state is None:
            return {}
        trunk = self.data.evals[split]
        return {0: self._cache.get(split, 0, self._version,
                                   lambda: full_logits(self.data.backbone, self.state, self.data.num_labels, trunk))}

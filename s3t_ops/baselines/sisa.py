"""SISA (Bourtoule et al., S&P 2021) on the same shards, slices, backbone and trunk as S3T.

Each shard trains one model incrementally over its slices in one fixed order (0, 1, ..., L-1), with
a checkpoint after every slice: checkpoint r is trained on slices 1..r. A deletion in slice r (1-based
position) invalidates checkpoints r..L of that shard only; SISA honours it by retraining from
checkpoint r-1 on slices r..L without the deleted examples (r = 1: from scratch).

Two model parameterisations:
- `model="full"` (classic SISA): one LoRA over every group, training continued slice by slice
  (checkpoint r = checkpoint r-1 trained `epochs` more on slices 1..r).
- `model="stages"`: S3T's stages over one sequence (stage r trains group r on slices 1..r). This is an
  S3T run with budget B = 1 (identity order) that retrains at once instead of switching prefixes,
  and its checkpoints are exactly those of S3T's identity sequence (same seeds and data order).

`order` places the slices (default: index order); a prior-aware SISA puts the slices most likely to be deleted
last (benchmarks/headline.py, skewed workload). `replica` r > 0 draws other seeds for the same data: B replicas
averaged (`SISAReplicas`) spend S3T's B-sequence training compute on SISA, the equal-compute control.

`retrain=False` gives SISA without retraining, for accuracy-vs-deletions curves: a deletion in slice
r drops checkpoints r..L and the shard serves checkpoint r-1 (`fallback="prefix"`) or dies at once
(`fallback="kill"`, the textbook m*H(m) deletion rate). Aggregation: averaged logits as in S3T
(`aggregation="mean"`, default, for a fair comparison) or majority vote (`"vote"`).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch

from s3t_ops.baselines.base import AGGREGATIONS, FitReport, ForgetCost, LogitCache, SharedData, UnlearningSystem, derive_seed
from s3t_ops.baselines.full_lora import full_logits, train_full_lora
from s3t_ops.checkpoints import stage_seed
from s3t_ops.ensemble import Ensemble, ShardModel
from s3t_ops.stages import train_stage

MODELS = ("full", "stages")
FALLBACKS = ("prefix", "kill")


class SISA(UnlearningSystem):
    def __init__(self, data: SharedData, retrain: bool = True, model: str = "full", aggregation: str = "mean",
                 fallback: str = "prefix", name: str | None = None, on_batch=None, order: tuple[int, ...] | None = None,
                 replica: int = 0):
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.data = data
        self.retrain = retrain
        self.model = model
        self.aggregation = aggregation
        self.fallback = fallback
        self.name = name or ("SISA" + ("" if retrain else " (no retraining)"))
        self.on_batch = on_batch
        self.live: set[str] = set(data.cells)
        L, m = data.slices, data.shards
        self.order = tuple(range(L)) if order is None else tuple(order)  # one sequence: slices in this order
        if sorted(self.order) != list(range(L)):
            raise ValueError(f"order must be a permutation of the {L} slices, got {self.order}")
        if model == "stages" and (self.order != tuple(range(L)) or replica):
            raise ValueError("the stages model is S3T's identity sequence: no other order or replica")
        self.replica = replica
        self.ckpts: list[list[dict | None]] = [[None] * L for _ in range(m)]
        self.depth = [0] * m
        self._version = [0] * m
        self._cache = LogitCache()

    def clone(self, retrain: bool | None = None, name: str | None = None, fallback: str | None = None) -> "SISA":
        """An independent copy sharing the trained checkpoints (so one fit serves SISA with and without retraining)."""
        other = copy.copy(self)
        other.retrain = self.retrain if retrain is None else retrain
        other.fallback = self.fallback if fallback is None else fallback
        other.name = name or ("SISA" + ("" if other.retrain else " (no retraining)"))
        other.live = set(self.live)
        other.ckpts = [list(c) for c in self.ckpts]
        other.depth = list(self.depth)
        other._version = list(self._version)
        other._cache = LogitCache()
        return other

    def at_depth(self, depth: int) -> "SISA":
        """A copy serving every shard at `depth` checkpoints (or its deepest, if fewer): what a prefix
        fallback of that depth is worth, measured without any deletion (benchmarks/prefix_depth.py)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        other = self.clone(retrain=False)
        other.depth = [min(depth, d) for d in self.depth]
        return other

    # --- training ---------------------------------------------------------------------------
    def _train_from(self, shard: int, r: int) -> tuple[int, int]:
        """Retrain checkpoints r..L of a shard from checkpoint r-1; returns (grad example-steps, checkpoints)."""
        d = self.data
        steps = trained = 0
        self.depth[shard] = r - 1
        for t in range(r, d.slices + 1):
            prefix = self.order[:t]
            ids = d.ids_in(self.live, shard, prefix)
            if not ids:  # every slice so far emptied: nothing to train on, the shard stays at this depth
                break
            labels = d.label_tensor(ids)
            if self.model == "full":
                init = self.ckpts[shard][t - 2] if t > 1 else None
                seed = derive_seed(d.cfg.seed, "sisa", shard, t, *(("replica", self.replica) if self.replica else ()))
                res = train_full_lora(d.backbone, d.train, ids, labels, seed, d.num_labels, init=init, on_batch=self.on_batch)
            else:
                parents = self.ckpts[shard][: t - 1]
                res = train_stage(d.backbone, d.train, ids, labels, t, parents, stage_seed(d.cfg.seed, shard, prefix),
                                  d.num_labels, on_batch=self.on_batch)
            self.ckpts[shard][t - 1] = res.state
            self.depth[shard] = t
            steps += res.grad_example_steps
            trained += 1
        self._version[shard] += 1
        return steps, trained

    def fit(self) -> FitReport:
        t0 = time.perf_counter()
        report = FitReport()
        for s in range(self.data.shards):
            steps, n = self._train_from(s, 1)
            report.grad_example_steps += steps
            report.models += n
        report.seconds = time.perf_counter() - t0
        return report

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        t0 = time.perf_counter()
        new = self.data.take(ids, self.live)
        first: dict[int, int] = {}  # shard -> earliest 1-based position hit
        for i in new:
            s, j = self.data.cells[i]
            first[s] = min(first.get(s, self.data.slices + 1), self.order.index(j) + 1)
        steps = trained = 0
        for s, r in sorted(first.items()):
            if self.retrain:
                n_steps, n = self._train_from(s, r)
                steps += n_steps
                trained += n
            else:
                keep = 0 if self.fallback == "kill" else min(self.depth[s], r - 1)
                for t in range(keep, self.data.slices):
                    self.ckpts[s][t] = None  # a checkpoint that saw the example is dropped, not kept aside
                if keep != self.depth[s]:
                    self.depth[s] = keep
                    self._version[s] += 1
        return ForgetCost(time.perf_counter() - t0, steps, retrained=trained)

    def pending_costs(self) -> dict[int, int]:
        """Shard -> example-steps to retrain it from its fallback checkpoint (shards serving full depth: absent)."""
        d = self.data
        out = {}
        for s in range(d.shards):
            if self.depth[s] < d.slices:
                out[s] = sum(len(d.ids_in(self.live, s, self.order[:t])) * d.cfg.epochs
                             for t in range(self.depth[s] + 1, d.slices + 1))
        return out

    def retrain_pending(self, budget: int | None = None) -> ForgetCost:
        """Retrain every shard serving a fallback checkpoint from it (a nightly schedule for SISA without
        retraining on the request path): background work, the requests were honoured by the fallback.
        `budget` (example-steps): shards are retrained cheapest first while they fit."""
        t0 = time.perf_counter()
        steps = trained = 0
        left = budget
        for cost, s in sorted((c, s) for s, c in self.pending_costs().items()):
            if left is not None:
                if cost > left:
                    continue
                left -= cost
            n_steps, n = self._train_from(s, self.depth[s] + 1)
            steps += n_steps
            trained += n
        return ForgetCost(0.0, 0, time.perf_counter() - t0, steps, trained)

    # --- serving ----------------------------------------------------------------------------
    def depths(self) -> dict[int, int]:
        return dict(enumerate(self.depth))

    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        trunk = self.data.evals[split]
        out = {}
        for s, dep in enumerate(self.depth):
            if dep == 0:
                continue
            if self.model == "full":
                state = self.ckpts[s][dep - 1]
                compute = lambda state=state: full_logits(self.data.backbone, state, self.data.num_labels, trunk)
            else:
                states = self.ckpts[s][:dep]
                compute = lambda s=s, dep=dep, states=states: Ensemble(
                    self.data.backbone, [ShardModel(s, dep, states)], self.data.num_labels).shard_logits_from_trunk(trunk)[s]
            out[s] = self._cache.get(split, s, (self._version[s], dep), compute)
        return out


class SISAReplicas(UnlearningSystem):
    """B independent SISA replicas per shard (other seeds, same shards, slices and order), logits averaged over
    all m x B models: SISA given the training compute of S3T's B sequences (the equal-compute control). Replica 0
    is classic SISA itself (`replicas[0]`, same seeds), so one fit serves both."""

    def __init__(self, data: SharedData, n: int, name: str | None = None, order: tuple[int, ...] | None = None, on_batch=None):
        if n < 1:
            raise ValueError(f"replicas must be >= 1, got {n}")
        self.data = data
        self.name = name or f"SISA x{n} replicas"
        self.replicas = [SISA(data, retrain=False, model="full", order=order, replica=r, on_batch=on_batch) for r in range(n)]

    @property
    def on_batch(self):
        return self.replicas[0].on_batch

    @on_batch.setter
    def on_batch(self, fn) -> None:
        for r in self.replicas:
            r.on_batch = fn

    def fit(self) -> FitReport:
        out = FitReport()
        for r in self.replicas:
            rep = r.fit()
            out.seconds += rep.seconds
            out.grad_example_steps += rep.grad_example_steps
            out.models += rep.models
        return out

    def clone(self) -> "SISAReplicas":
        other = copy.copy(self)
        other.replicas = [r.clone(retrain=False) for r in self.replicas]
        return other

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        ids = list(ids)
        costs = [r.forget(ids) for r in self.replicas]
        return ForgetCost(sum(c.seconds for c in costs), sum(c.grad_example_steps for c in costs))

    def pending_costs(self) -> dict[tuple[int, int], int]:
        return {(r, s): c for r, rep in enumerate(self.replicas) for s, c in rep.pending_costs().items()}

    def retrain_pending(self, budget: int | None = None) -> ForgetCost:
        """Replica by replica (replica 0 first), each shard cheapest first, within `budget` example-steps."""
        t0 = time.perf_counter()
        steps = trained = 0
        for rep in self.replicas:
            left = None if budget is None else budget - steps
            cost = rep.retrain_pending(left)
            steps += cost.background_grad_example_steps
            trained += cost.retrained
        return ForgetCost(0.0, 0, time.perf_counter() - t0, steps, trained)

    def depths(self) -> dict[int, int]:
        """Deepest checkpoint any replica of the shard serves."""
        return {s: max(r.depth[s] for r in self.replicas) for s in range(self.data.shards)}

    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        """Per shard: the mean of its live replicas' logits (equal weight for every live model overall)."""
        per: dict[int, list[torch.Tensor]] = {}
        for r in self.replicas:
            for s, lg in r.shard_logits(split).items():
                per.setdefault(s, []).append(lg)
        # the ensemble mean over shards of per-shard means weights every model equally only when every shard has
        # the same number of live replicas; replicas share order and slices, so they fall back together
        return {s: torch.stack(v).mean(0) for s, v in per.items()}

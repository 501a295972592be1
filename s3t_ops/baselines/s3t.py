"""S3T itself behind the baselines' interface: the engine's ledger, stage checkpoints and serving plan.

A deletion is honoured by `S3T.forget` (a new plan over checkpoints that never saw the example, no
gradient step). The retraining policy is separate and runs after the request is honoured:
`retrain_every=0` never retrains (deactivation only), `1` retrains the stale stages after every
request (eager), `k` after every k-th request (batched, as a schedule would).

`ForgetCost.seconds` is the engine's whole honour path (durable ledger transaction + new plan
recorded); `details["planner_seconds"]` is the serving decision alone (pure planner), reported apart.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from s3t_ops.baselines.base import FitReport, ForgetCost, LogitCache, UnlearningSystem
from s3t_ops.ensemble import Ensemble, ShardModel
from s3t_ops.planner import plan_for_deletions


class S3TSystem(UnlearningSystem):
    def __init__(self, engine, retrain_every: int = 0, name: str | None = None):
        if retrain_every < 0:
            raise ValueError(f"retrain_every must be >= 0 (0 = never), got {retrain_every}")
        self.engine = engine
        self.retrain_every = retrain_every
        self.name = name or ("S3T (no retraining)" if retrain_every == 0 else
                             "S3T (eager retraining)" if retrain_every == 1 else f"S3T (retrain every {retrain_every})")
        self._pending = 0
        self._dirty: dict[int, set[int]] = {}  # (shard -> dirty slices) since the last retraining, for the planner timing
        self._cache = LogitCache()
        self._labels: dict[str, torch.Tensor] = {}

    def fit(self) -> FitReport:
        report = self.engine.fit()
        return FitReport(report.seconds, report.grad_example_steps, len(report.trained))

    def clone(self, state_dir: str | Path, retrain_every: int | None = None, name: str | None = None) -> "S3TSystem":
        """A second S3T on a copy of this state folder (same ledger contents, checkpoints and trunk; same backbone)."""
        from s3t_ops.engine import S3T, StateError

        dst = Path(state_dir)
        if self.engine.cfg.storage_url is not None:
            raise StateError(f"{self.engine.root} keeps its files in {self.engine.cfg.storage_url}: a copy of the folder "
                             "would share them; clone a state stored in its folder")
        if dst.exists():
            raise FileExistsError(f"{dst} already exists")
        shutil.copytree(self.engine.root, dst)
        engine = S3T.open(dst, backbone=self.engine.backbone, progress=self.engine.progress, publisher=self.engine.publisher)
        return S3TSystem(engine, self.retrain_every if retrain_every is None else retrain_every, name)

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        rep = self.engine.forget(ids)  # the engine's whole lifecycle step: honour, publish, erase
        self._pending += 1
        for s, j in rep.dirty:
            self._dirty.setdefault(int(s), set()).add(int(j))
        t0 = time.perf_counter()  # the serving decision alone, without the ledger's durable bookkeeping (reported apart)
        plan_for_deletions(self.engine.sequences, self.engine.cfg.shards, self._dirty)
        planner_s = time.perf_counter() - t0
        bg_s, bg_steps, trained = 0.0, 0, 0
        if self.retrain_every and self._pending >= self.retrain_every:
            t0 = time.perf_counter()
            tr = self.engine.retrain()
            bg_s, bg_steps, trained = time.perf_counter() - t0, tr.grad_example_steps, len(tr.trained)
            self._pending = 0
            self._dirty.clear()
        return ForgetCost(rep.honour_seconds, rep.grad_example_steps, bg_s, bg_steps, trained,
                          details={"erase_seconds": rep.erase_seconds, "purged_checkpoints": rep.purged_checkpoints,
                                   "planner_seconds": planner_s})

    def pending_costs(self) -> dict[tuple[int, int], int]:
        """(shard, sequence) -> example-steps to bring that stale chain back to full depth."""
        return self.engine.chain_costs(self.engine.stale_chains())

    def retrain_pending(self, budget: int | None = None, policy: str = "all") -> ForgetCost:
        """Retrain stale stages now (a nightly schedule): background work, nothing on the request path. The
        engine's retraining `policy` and `budget` (example-steps) pick which chains (s3t_ops/policy.py)."""
        t0 = time.perf_counter()
        tr = self.engine.retrain(policy, budget)
        self._pending = 0
        self._dirty.clear()
        return ForgetCost(0.0, 0, time.perf_counter() - t0, tr.grad_example_steps, len(tr.trained))

    def _served_keys(self) -> dict[int, list[str]]:
        served = self.engine.served()
        if served is None:
            return {}
        return {int(s): list(k) for s, k in served[1]["checkpoints"].items()}

    def depths(self) -> dict[int, int]:
        keys = self._served_keys()
        return {s: len(keys.get(s, [])) for s in range(self.engine.cfg.shards)}

    def shard_logits(self, split: str) -> dict[int, torch.Tensor]:
        trunk = self.engine.trunk(f"{split}.safetensors")
        n = len(self.engine.label_names)
        out = {}
        for s, keys in sorted(self._served_keys().items()):
            if not keys:
                continue

            def compute(s=s, keys=keys):
                states = [self.engine.load_checkpoint(k) for k in keys]
                return Ensemble(self.engine.backbone, [ShardModel(s, len(keys), states)], n).shard_logits_from_trunk(trunk)[s]

            out[s] = self._cache.get(split, s, tuple(keys), compute)  # keys are content hashes: a perfect cache token
        return out

    def eval_labels(self, split: str) -> torch.Tensor:
        if split not in self._labels:
            self._labels[split] = self.engine.labels(self.engine.trunk(f"{split}.safetensors").ids)
        return self._labels[split]


class S3TView(S3TSystem):
    """S3T restricted to some of its trained sequences, over the same engine and checkpoints: with the
    first sequence only, this is S3T with B = 1 (its checkpoints are a subset of B = L's), evaluated
    without training anything. It follows the deletions its engine honours; it never forgets itself."""

    def __init__(self, system: S3TSystem, sequences: Iterable[int], name: str):
        super().__init__(system.engine, 0, name)
        self.sequences = tuple(sequences)

    def fit(self) -> FitReport:
        raise NotImplementedError("a view serves its system's checkpoints: fit the system")

    def forget(self, ids: Iterable[str]) -> ForgetCost:
        raise NotImplementedError("a view follows the deletions of its system's engine")

    def _served_keys(self) -> dict[int, list[str]]:
        _, keys = self.engine.current_plan(self.sequences)
        return keys

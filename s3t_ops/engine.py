"""The S3T lifecycle every door calls: create / open (then repair), fit, forget, retrain.

One flow, many doors: the CLI, the Dagster assets, the demo, the baselines' S3T wrapper, the server and the
benchmarks each make one call here, and what happens is reported to the state's publisher (the MLflow registry by
default), so every door leaves the same ledger, files and registry.

This is a facade over rooms that each do one job and receive the state (state.py), never the engine:
opening.py (create, open, migrate), training.py (stage specs, train one / all), serving.py (plan, ensemble, audit,
publish), forgetting.py (honour -> publish -> purge -> erase), repair.py (what every command does first) and
erasure.py. The state's attributes (cfg, ledger, checkpoints, storage, publisher, backbone, tags, ...) and queries
(examples, trunk, checkpoint_rows, served, ...) are the engine's too. Crash safety: docs/lifecycle.md.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from s3t_ops import forgetting, serving, training
from s3t_ops.config import S3TConfig
from s3t_ops.forgetting import ForgetReport
from s3t_ops.ledger import LedgerError
from s3t_ops.memorization.artifacts import ERASER as MEMORIZATION_ERASER
from s3t_ops.opening import create_state, open_state
from s3t_ops.publish import Publisher
from s3t_ops.repair import RepairReport, repair
from s3t_ops.state import CONFIG_FILE, State, StateError
from s3t_ops.training import StageSpec, TrainReport

ERASERS = (MEMORIZATION_ERASER,)  # who keeps files built from examples besides the trunk and slices (erasure.py)


class S3T:
    """One S3T model over one state folder. Build it with `create`, `open` or `open_or_create`."""

    def __init__(self, state: State):
        self.state = state
        self.last_repair = RepairReport()  # what `open` repaired

    def __getattr__(self, name: str):
        """The state's attributes and queries (cfg, ledger, checkpoints, examples, trunk, served, ...)."""
        if name == "state":  # not set yet: no state to forward to
            raise AttributeError(name)
        return getattr(self.state, name)

    @property
    def tags(self) -> dict[str, str]:
        """Added to registry runs and versions (e.g. the Dagster run id): the state's, which every room reads."""
        return self.state.tags

    @tags.setter
    def tags(self, value: dict[str, str]) -> None:
        self.state.tags = dict(value)

    # --- create / open -----------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: S3TConfig, source: str | Path | None = None, publisher: Publisher | None = None,
               backbone=None, progress: bool = True, secret: bytes | None = None) -> "S3T":
        """Ingest into a NEW state folder (opening.py): nothing is left behind when it fails."""
        root = create_state(cfg, source, publisher, secret, backbone=backbone, progress=progress, erasers=ERASERS)
        return cls.open(root, backbone=backbone, progress=progress, publisher=publisher)

    @classmethod
    def open(cls, state_dir: str | Path, backbone=None, progress: bool = True, publisher: Publisher | None = None,
             repair: bool = True, check_registry: bool = False) -> "S3T":
        """Open an existing state; first repair what a crash left (repair.py)."""
        engine = cls(open_state(state_dir, backbone=backbone, progress=progress, publisher=publisher, erasers=ERASERS))
        if repair:
            engine.last_repair = engine.repair(check_registry)
        return engine

    @classmethod
    def open_or_create(cls, cfg: S3TConfig, source: str | Path | None = None, **kwargs) -> "S3T":
        if (Path(cfg.state_dir) / CONFIG_FILE).is_file():
            kwargs.pop("secret", None)
            return cls.open(cfg.state_dir, **kwargs)
        return cls.create(cfg, source, **kwargs)

    def repair(self, check_registry: bool = False) -> RepairReport:
        return repair(self.state, check_registry)

    # --- fit / retrain -----------------------------------------------------------------------------
    def fit(self, policy: str = "all", budget: int | None = None, workers: int = 1) -> TrainReport:
        """Cache the trunk, train the missing stages the retraining policy picks (all by default) in `workers`
        processes, serve and publish (training.py)."""
        training.build_trunk(self.state, workers)
        report = training.train(self.state, policy, budget, workers)
        serving.serve(self.state)
        return report

    retrain = fit

    def train(self, policy: str = "all", budget: int | None = None, workers: int = 1) -> TrainReport:
        """Train the missing stages the policy picks, without serving (training.py)."""
        return training.train(self.state, policy, budget, workers)

    def train_one(self, spec: StageSpec, on_batch=None) -> dict | None:
        return training.train_one(self.state, spec, on_batch)

    def materialize_slice(self, shard: int, slc: int) -> dict:
        """One slice's live members as Parquet (the pipeline's slice_data) plus its trunk cache."""
        return self.state.materialize_slice(shard, slc)

    def materialize_stage(self, shard: int, seq: int, stage: int, on_batch=None) -> tuple[dict, bool]:
        """One stage partition under the current data: (checkpoint row, reused?)."""
        return training.materialize_stage(self.state, shard, seq, stage, on_batch)

    def stage_specs(self, versions=None) -> list[StageSpec]:
        return training.stage_specs(self.state, versions)

    def missing_stages(self, versions=None, rows=None) -> list[StageSpec]:
        return training.missing_stages(self.state, versions, rows)

    def stale_chains(self, versions=None, rows=None):
        return training.stale_chains(self.state, versions, rows)

    def chains_to_retrain(self, policy: str = "all", budget: int | None = None):
        return training.chains_to_retrain(self.state, policy, budget)

    def chain_costs(self, chains) -> dict[tuple[int, int], int]:
        return training.chain_costs(self.state, chains)

    def stale_partitions(self) -> dict[int, list[tuple[int, int]]]:
        return training.stale_partitions(self.state)

    # --- serve --------------------------------------------------------------------------------------
    def serve(self, publish: bool = True):
        """Record the current plan as the served one (unless it is already), then publish it."""
        return serving.serve(self.state, publish)

    def publish(self) -> int | None:
        return serving.publish(self.state)

    def plan_for(self, versions, rows, sequences: Iterable[int] | None = None):
        return serving.plan_for(self.state, versions, rows, sequences)

    def current_plan(self, sequences: Iterable[int] | None = None):
        return serving.current_plan(self.state, sequences)

    def served_plan(self):
        return serving.served_plan(self.state)

    def ensemble(self, record: dict | None = None):
        return serving.ensemble(self.state, record)

    def evaluate(self, split: str = "test", record: dict | None = None) -> float:
        return serving.evaluate(self.state, split, record)

    def majority_accuracy(self, split: str = "test") -> float:
        return serving.majority_accuracy(self.state, split)

    def audit(self, record: dict | None = None) -> dict[str, set[str]]:
        """Exactness audit: served checkpoint key -> tombstones of deleted examples in its lineage ({} = exact)."""
        return serving.audit(self.state, record)

    # --- forget -------------------------------------------------------------------------------------
    def forget(self, ids: Iterable[str], texts: bool = False) -> ForgetReport:
        """Honour deletions at once (no gradient step), move the registry's champion, erase their data everywhere.
        `texts`: exact texts of live examples may stand for their ids."""
        return forgetting.forget(self.state, ids, texts=texts)

    def purge_stale(self) -> int:
        return forgetting.purge_stale(self.state)

    def deletions_after(self, seen: int):
        return forgetting.deletions_after(self.state, seen)


__all__ = ["S3T", "StageSpec", "TrainReport", "ForgetReport", "RepairReport", "StateError", "LedgerError"]

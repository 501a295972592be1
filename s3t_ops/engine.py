"""The S3T lifecycle that every door calls: create/open (with repair), fit, forget, retrain.

One flow, many doors: the CLI, the Dagster assets, the demo, the baselines' S3T wrapper and the
benchmarks each make one call here, and the engine reports what happened to its publisher (the
MLflow registry by default: `stage_trained`, `plan_served`), so every door leaves the same ledger,
files and registry.

State lives in one folder (`cfg.state_dir`): config.json, secret.key (tombstone key), ledger.duckdb,
mlflow.db and mlartifacts/ (the default registry), memorization/ (approximate unlearning artifacts).
The data files are in the state's `Storage` (`cfg.storage_url`; by default the state folder itself):
trunk/ (cached frozen hidden states per training slice, plus val/test), slices/ (live members per
slice as Parquet, for the pipeline), checkpoints/ (content-addressed stage checkpoints).

Crash safety (docs/lifecycle.md): honouring is one ledger transaction; everything after it
(publishing, erasure, purging) is an idempotent step driven by the ledger, which `open` resumes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from s3t_ops.checkpoints import CheckpointStore, IntegrityError, root_key, stage_key, stage_seed
from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.datafiles import DataFiles
from s3t_ops.faults import crash_point
from s3t_ops.files import write_json
from s3t_ops.ledger import Ledger, LedgerError, now
from s3t_ops.partition import assign
from s3t_ops.planner import ServingPlan, serving_plan
from s3t_ops.publish import Publisher, default_publisher, settings_from_env
from s3t_ops.sequences import select_sequences
from s3t_ops.storage import Storage
from s3t_ops.tombstones import Keyring

SCRATCH = ".staging"  # local staging of files bound for a non-local storage (s3t_ops/storage.py)

if TYPE_CHECKING:
    import torch

    from s3t_ops.backbone import Backbone
    from s3t_ops.ensemble import Ensemble
    from s3t_ops.trunk import TrunkCache

CONFIG_FILE = "config.json"
CREATING = ".creating-"


class StateError(RuntimeError):
    """The state folder is missing, already used, or inconsistent."""


class StaleStage(StateError):
    """A stage's data or parent changed (a deletion) since its spec was computed: recompute what is missing."""


@dataclass(frozen=True)
class StageSpec:
    """One stage under the current data: stage k of sequence q of shard s, and its content key."""

    shard: int
    seq: int
    prefix: tuple[int, ...]
    key: str
    parent_key: str | None
    prefix_versions: tuple[str, ...]  # data version of each slice of the prefix
    seed: int

    @property
    def stage(self) -> int:
        return len(self.prefix)

    @property
    def slice(self) -> int:
        return self.prefix[-1]

    @property
    def slice_version(self) -> str:
        return self.prefix_versions[-1]


@dataclass
class TrainReport:
    trained: list[StageSpec] = field(default_factory=list)
    reused: int = 0
    discarded: int = 0  # trained on data deleted meanwhile: never recorded
    skipped: int = 0  # found stale before training (a deletion came in): recomputed
    deferred: int = 0  # stale (shard, sequence) chains the retraining policy left for a later run
    grad_example_steps: int = 0
    seconds: float = 0.0


@dataclass
class ForgetReport:
    new: tuple[str, ...]
    already: tuple[str, ...]
    dirty: tuple[tuple[int, int], ...]
    plan_id: int | None
    plan: ServingPlan | None
    honour_seconds: float  # request received -> new plan committed in the ledger
    publish_seconds: float  # -> registry champion moved (0 without a registry)
    erase_seconds: float  # cached states, slice files, memorization, registry, ledger bytes; stale checkpoints
    purged_checkpoints: int
    model_version: int | None = None
    champion_moved_at: float | None = None  # wall clock (epoch seconds) when the registry served the new plan
    grad_example_steps: int = 0  # honouring never trains


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)
    registry_error: str | None = None  # the registry could not be reached: what waits for it is retried next time

    def __bool__(self) -> bool:
        return bool(self.actions)


def _slice_file(shard: int, slc: int) -> str:
    return f"train-s{shard}-j{slc}.safetensors"


def _slice_of(name: str) -> tuple[int, int] | None:
    """(shard, slice) of a training slice's trunk file name; None for val/test."""
    if not name.startswith("train-s"):
        return None
    s, j = name.removeprefix("train-s").removesuffix(".safetensors").split("-j")
    return int(s), int(j)


def trunk_file(name: str) -> str:
    """A trunk cache file's path in the storage (`name`: a training slice's file, val or test)."""
    return f"trunk/{name}"


def slice_parquet(shard: int, slc: int) -> str:
    """A slice's Parquet file's path in the storage."""
    return f"slices/s{shard}-j{slc}.parquet"


class S3T:
    """One S3T model over one state folder. Build it with `create`, `open` or `open_or_create`."""

    def __init__(self, cfg: S3TConfig, backbone: "Backbone | None" = None, progress: bool = True,
                 publisher: Publisher | None = None):
        if backbone is not None and backbone.cfg.training_fingerprint() != cfg.training_fingerprint():
            # stages read the stage model and hyper-parameters from the backbone's config: another config's
            # backbone would train other stages under this state's keys
            raise StateError(f"the backbone given was built for another config than the state in {cfg.state_dir}")
        self.cfg = cfg
        self.root = Path(cfg.state_dir)
        self.ledger = Ledger(self.root / "ledger.duckdb")
        self.storage = Storage(cfg.storage_url or cfg.state_dir, scratch=Path(cfg.state_dir) / SCRATCH)
        self.store = CheckpointStore(self.storage)
        self.data_files = DataFiles(self.storage, self.ledger)
        self._backbone = backbone
        self._trunks: dict[str, tuple[Hashable, "TrunkCache"]] = {}  # name -> (storage stamp, cache)
        self.progress = progress
        self._publisher = publisher
        self._label_names: list[str] | None = None
        self._backbone_fp: str | None = None
        self._rows: dict[str, dict] | None = None
        self.tags: dict[str, str] = {}  # added to registry runs and versions (e.g. the Dagster run id)
        self.last_repair = RepairReport()  # what `open` repaired
        self.sequences = select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior)

    # --- lifecycle: create / open -------------------------------------------------------------
    @classmethod
    def create(cls, cfg: S3TConfig, source: str | Path | None = None, publisher: Publisher | None = None,
               backbone: "Backbone | None" = None, progress: bool = True, secret: bytes | None = None) -> "S3T":
        """Ingest into a NEW state folder. The folder appears only when ingest succeeded: it is built under a
        hidden sibling name and renamed into place, so a failure leaves nothing behind.

        The folder may already hold what our own servers create in it before a state exists (an `mlflow ui`
        started on `<state>/mlflow.db` first, as the README's order does): the state is then built beside it
        and moved in, config.json last (a state is a folder with a config.json). `secret`: the tombstone key,
        for a state that must share another's keyspace (tests comparing two states' keys); random otherwise."""
        from s3t_ops.model_dir import backbone_shape

        root = Path(cfg.state_dir)
        if root.is_file():
            raise StateError(f"--state {root} is a file, not a folder")
        server_files = _server_files(root)
        cfg.check_backbone(*backbone_shape(cfg))  # before anything is written
        if cfg.storage_url is not None:
            Storage(cfg.storage_url).check_empty()
        parent = root.resolve().parent
        if not parent.is_dir():
            raise StateError(f"cannot create {root}: {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StateError(f"cannot create {root}: permission denied in {parent}")
        _remove_abandoned_creations(parent, root.name)
        tmp = parent / f".{root.name}{CREATING}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            engine = cls(cfg.replace(state_dir=tmp), backbone=backbone, progress=progress, publisher=publisher)
            engine._ingest(source, root.resolve(), secret)
            crash_point("during_ingest")
            if not server_files:
                if root.exists():
                    root.rmdir()  # empty: checked above
                os.rename(tmp, root)
            else:
                _move_in(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(root, backbone=backbone, progress=progress, publisher=publisher)

    @classmethod
    def open(cls, state_dir: str | Path, backbone: "Backbone | None" = None, progress: bool = True,
             publisher: Publisher | None = None, repair: bool = True, check_registry: bool = False) -> "S3T":
        """Open an existing state; first repair what a crash left (see `repair`)."""
        root = Path(state_dir)
        if root.is_file():
            raise StateError(f"--state {root} is a file, not a folder")
        path = root / CONFIG_FILE
        if not path.is_file():
            raise StateError(f"no S3T state in {root} (missing {CONFIG_FILE}); run `s3t demo` or `s3t train` first")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is damaged ({exc})") from None
        data["state_dir"] = str(root)
        engine = cls(S3TConfig.from_dict(data), backbone, progress, publisher)
        engine.ledger.check()  # a damaged ledger is reported before anything writes to it
        engine._migrate()
        engine._reroot()
        engine.publisher  # resolve the registry now: a misconfiguration fails before any write
        if repair:
            engine.last_repair = engine.repair(check_registry)
        return engine

    def _migrate(self) -> None:
        """Bring an older ledger up to date (ledger.py MIGRATABLE), then finish renaming checkpoint files to the
        keys it re-derived (a crash between the two is finished here on the next open)."""
        from s3t_ops.ledger import MIGRATABLE

        if self.ledger.schema_version in MIGRATABLE:
            n_labels = len(self.label_names)
            with self.ledger.locked():
                self.ledger.migrate_v2(lambda s: root_key(self.cfg.training_fingerprint(), self.backbone_fingerprint(), s, n_labels),
                                       stage_key, self.data_files.hashes_on_disk)
        if self.ledger.get_meta("state_id") is None:
            import uuid

            self.ledger.set_meta("state_id", uuid.uuid4().hex)
        pending = self.ledger.get_meta("pending_renames")
        if pending:
            with self.ledger.locked():
                for old, new in pending.items():
                    self.store.rename(old, new)
                self.ledger.set_meta("pending_renames", None)

    def _reroot(self) -> None:
        """A state moved or copied to another folder: the paths its own MLflow store recorded are rewritten to the
        folder it is in now (s3t_ops/mlflow_db.py), so it erases and publishes only inside itself. A copy that
        publishes to a shared store, beside an original that still exists, gets an id of its own: publishing under
        the original's model name is then refused instead of mixing two states' versions. Nothing is written when
        nothing moved."""
        from s3t_ops import mlflow_db

        here = str(self.root.resolve())
        settings = self.ledger.get_meta("registry") or {}
        if settings.get("kind") != "mlflow":
            return
        if not settings.get("tracking_uri"):
            db = self.root / "mlflow.db"
            before = mlflow_db.recorded_root(db, settings.get("experiment") or "s3t")
            if before not in (None, here):
                with self.ledger.locked():
                    mlflow_db.reroot(db, before, here)
            return
        recorded = self.ledger.get_meta("root")
        if recorded not in (None, here):
            with self.ledger.locked():
                if (Path(recorded) / CONFIG_FILE).is_file():  # the original is still there: this is a copy
                    import uuid

                    self.ledger.set_meta("state_id", uuid.uuid4().hex)
                self.ledger.set_meta("root", here)

    @classmethod
    def open_or_create(cls, cfg: S3TConfig, source: str | Path | None = None, **kwargs) -> "S3T":
        if (Path(cfg.state_dir) / CONFIG_FILE).is_file():
            return cls.open(cfg.state_dir, **kwargs)
        return cls.create(cfg, source, **kwargs)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = default_publisher(self)
        return self._publisher

    @property
    def backbone(self) -> "Backbone":
        if self._backbone is None:
            from s3t_ops.backbone import Backbone

            self._backbone = Backbone(self.cfg)
        return self._backbone

    @property
    def label_names(self) -> list[str]:
        if self._label_names is None:
            self._label_names = list(self.ledger.get_meta("label_names"))
        return self._label_names

    def _bar(self, total: int, desc: str, unit: str = "ex"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False, dynamic_ncols=True)

    # --- ingest -----------------------------------------------------------------------------
    def _ingest(self, source: str | Path | None, final_root: Path, secret: bytes | None = None) -> dict[str, int]:
        """Read the source, assign (shard, slice), write the ledger, the tombstone key, the registry's store and
        config.json (into this engine's folder, which becomes `final_root`)."""
        import uuid

        from s3t_ops.data import build_dataset, load_source

        ds = build_dataset(load_source(source), self.cfg.n_train, self.cfg.n_val, self.cfg.n_test, self.cfg.seed)
        frame = ds.frame.copy()
        n_train = int((frame["split"] == "train").sum())
        self.cfg.check_examples(n_train)
        cells = [assign(i, self.cfg.shards, self.cfg.slices, self.cfg.seed) if s == "train" else (None, None)
                 for i, s in zip(frame["id"], frame["split"])]
        frame["shard"] = pd.array([c[0] for c in cells], dtype="Int64")
        frame["slice"] = pd.array([c[1] for c in cells], dtype="Int64")
        empty = {(s, j) for s in range(self.cfg.shards) for j in range(self.cfg.slices)} - {
            (int(a), int(b)) for a, b in zip(frame["shard"].dropna(), frame["slice"].dropna())}
        if empty:
            raise ConfigError("shards", f"{len(empty)} slice(s) would be empty with {n_train} training examples; use fewer shards or slices")
        self.ledger._keyring = Keyring.create(self.root, secret)
        self.ledger.create()
        self.ledger.add_examples(frame)
        self.ledger.set_meta("label_names", list(ds.label_names))
        self.ledger.set_meta("source", str(source or "tweets"))
        state_id = uuid.uuid4().hex
        self.ledger.set_meta("state_id", state_id)
        self.ledger.set_meta("root", str(final_root))
        registry = self._publisher.describe() if self._publisher is not None else settings_from_env()
        self.ledger.set_meta("registry", registry)
        if self._publisher is not None and hasattr(self._publisher, "state_id"):
            self._publisher.state_id = state_id
        prepare_registry(registry, self.root, final_root, state_id)
        write_json(self.root / CONFIG_FILE, {k: v for k, v in self.cfg.to_dict().items() if k != "state_dir"})
        return {k: int(v) for k, v in frame["split"].value_counts().items()}

    # --- data view --------------------------------------------------------------------------
    def examples(self, split: str | None = None) -> pd.DataFrame:
        """Live examples: id, text, label, split, shard, slice."""
        return self.ledger.examples(split)

    def labels(self, ids: list[str]) -> "torch.Tensor":
        """Label tensor of live examples, in the order given."""
        import torch

        if not hasattr(self, "_label_map") or any(i not in self._label_map for i in ids):
            ex = self.ledger.examples()
            self._label_map = dict(zip(ex["id"], ex["label"].astype(int)))
        missing = [i for i in ids if i not in self._label_map]
        if missing:
            raise StateError(f"{len(missing)} example(s) are not live: {missing[:3]}")
        return torch.tensor([self._label_map[i] for i in ids], dtype=torch.long)

    def resolve(self, ids_or_texts: Iterable[str]) -> list[str]:
        """Ids as given, except exact texts of live examples, which become their ids (the UI's forget)."""
        values = [str(v) for v in ids_or_texts]
        by_text = self.ledger.find(values)
        return [by_text.get(v, v) for v in values]

    # --- trunk ------------------------------------------------------------------------------
    def build_trunk(self, slices: Iterable[tuple[int, int]] | None = None, eval_splits: bool = True) -> int:
        """Compute the frozen hidden states of live examples not cached yet (all slices, or the ones named)."""
        from s3t_ops.trunk import compute_trunk

        wanted = None if slices is None else set(slices)
        todo: list[tuple[str, pd.DataFrame]] = []
        train = self.ledger.examples("train")
        for (s, j), part in train.groupby(["shard", "slice"]):
            if wanted is None or (int(s), int(j)) in wanted:
                todo.append((_slice_file(int(s), int(j)), part))
        if eval_splits:
            for split in ("val", "test"):
                todo.append((f"{split}.safetensors", self.ledger.examples(split)))
        todo = [(n, p) for n, p in todo if not self.data_files.intact(trunk_file(n))]  # missing or damaged: (re)built
        total = sum(len(p) for _, p in todo)
        with self._bar(total, "trunk (frozen backbone, once per example)") as bar:
            for name, part in todo:
                cache = compute_trunk(self.backbone, part["id"].tolist(), part["text"].tolist(), progress=bar.update)
                self.data_files.write(trunk_file(name), cache.to_bytes())
        return total

    def trunk(self, name: str) -> "TrunkCache":
        """A cached trunk file, reloaded when erasure (maybe in another process) rewrote it. A file that does not hold
        the bytes the ledger recorded for it (damaged, or cut short by a crash) is rebuilt from the backbone first:
        it is derived data, never read damaged."""
        from s3t_ops.trunk import TrunkCache

        rel = trunk_file(name)
        stamp = self.storage.stamp(rel)
        if stamp is None:
            raise StateError(f"trunk cache {self.storage.location(rel)} is missing; run the trunk step first")
        hit = self._trunks.get(name)
        if hit is None or hit[0] != stamp:
            if not self.data_files.intact(rel):
                self.data_files.remove(rel)
                cell = _slice_of(name)
                self.build_trunk(slices=[cell] if cell else [], eval_splits=cell is None)
                stamp = self.storage.stamp(rel)
            self._trunks[name] = (stamp, TrunkCache.load(self.storage, rel))
        return self._trunks[name][1]

    def slice_trunk(self, shard: int, slc: int) -> "TrunkCache":
        return self.trunk(_slice_file(shard, slc))

    def materialize_slice(self, shard: int, slc: int) -> dict:
        """One slice's live members as Parquet (the pipeline's slice_data) plus its trunk cache."""
        self.build_trunk(slices=[(shard, slc)], eval_splits=False)
        members = self.ledger.members(shard, slc)
        buf = io.BytesIO()
        members.to_parquet(buf, index=False)
        location = self.data_files.write(slice_parquet(shard, slc), buf.getvalue())
        return {"shard": shard, "slice": slc, "version": self.ledger.keyring.slice_version(members["id"]), "n_live": len(members),
                "path": location, "trunk_rows": len(self.slice_trunk(shard, slc)), "ids": set(members["id"])}

    # --- stages -----------------------------------------------------------------------------
    def stage_specs(self, versions: dict[tuple[int, int], str] | None = None) -> list[StageSpec]:
        """Every (shard, sequence, stage) under the given (default: current) slice versions, stage by stage."""
        versions = versions or self.ledger.slice_versions(self.cfg.shards, self.cfg.slices)
        n_labels = len(self.label_names)
        specs = []
        for s in range(self.cfg.shards):
            root = root_key(self.cfg.training_fingerprint(), self.backbone_fingerprint(), s, n_labels)
            for q, perm in enumerate(self.sequences):
                parent = root
                for k in range(1, self.cfg.slices + 1):
                    prefix = tuple(perm[:k])
                    pv = tuple(versions[(s, j)] for j in prefix)
                    key = stage_key(parent, prefix[-1], pv[-1], k)
                    specs.append(StageSpec(s, q, prefix, key, None if k == 1 else parent, pv, stage_seed(self.cfg.seed, s, prefix)))
                    parent = key
        return sorted(specs, key=lambda x: (x.stage, x.shard, x.seq))

    def backbone_fingerprint(self) -> str:
        """Recorded at first use, so later commands need not load the backbone to compute keys."""
        if self._backbone_fp is None:
            fp = self.ledger.get_meta("backbone_fingerprint")
            if fp is None:
                from s3t_ops.model_dir import backbone_fingerprint

                fp = backbone_fingerprint(self.cfg)
                self.ledger.set_meta("backbone_fingerprint", fp)
            self._backbone_fp = str(fp)
        return self._backbone_fp

    def checkpoint_rows(self, con=None) -> dict[str, dict]:
        """Live checkpoint rows by key (cached until this engine writes the ledger)."""
        if con is not None or self._rows is None:
            rows = self.ledger.checkpoints(con=con).astype(object)
            rows = rows.where(rows.notna(), None)
            out = {r["key"]: r for r in rows.to_dict("records")}
            if con is not None:
                return out
            self._rows = out
        return self._rows

    def _forget_cache(self) -> None:
        self._rows = None

    def _intact(self, key: str, rows: dict[str, dict]) -> bool:
        return key in rows and self.store.intact(key, rows[key]["sha256"])

    def missing_stages(self, versions=None, rows=None) -> list[StageSpec]:
        """Stages without an intact checkpoint under the current data (deduplicated: shared prefixes train once)."""
        rows = self.checkpoint_rows() if rows is None else rows
        seen, out = set(), []
        for spec in self.stage_specs(versions):
            if spec.key not in seen and not self._intact(spec.key, rows):
                out.append(spec)
            seen.add(spec.key)
        return out

    def _stale_in(self, con) -> bool:
        versions = self.ledger.slice_versions(self.cfg.shards, self.cfg.slices, con=con)
        return bool(self.missing_stages(versions, self.checkpoint_rows(con)))

    def train_one(self, spec: StageSpec, on_batch=None) -> dict | None:
        """Train and record one stage. StaleStage before training when its data or parent changed since the
        spec was computed; None when that happened during training (the weights are discarded, nothing recorded)."""
        from s3t_ops.checkpoints import canonical_bytes
        from s3t_ops.stages import train_stage
        from s3t_ops.trunk import TrunkCache

        rows = self.checkpoint_rows()
        chain, key = [], spec.parent_key
        while key is not None:
            if not self._intact(key, rows):
                raise StaleStage(f"the parent checkpoint of stage {spec.stage} (shard {spec.shard}) is gone")
            chain.append(key)
            key = rows[key]["parent_key"]
        try:
            parents = [self.store.load(k, rows[k]["sha256"]) for k in reversed(chain)]
        except IntegrityError as exc:
            raise StaleStage(str(exc)) from None
        parts, ids, labels = [], [], []
        for j, version in zip(spec.prefix, spec.prefix_versions):
            members = self.ledger.members(spec.shard, j)
            if self.ledger.keyring.slice_version(members["id"]) != version:
                raise StaleStage(f"slice {j} of shard {spec.shard} changed (a deletion) after the stage was planned")
            try:
                parts.append(self.slice_trunk(spec.shard, j).subset(members["id"].tolist()))
            except (KeyError, StateError):  # cache missing or behind the ledger: rebuild this slice
                self.data_files.remove(trunk_file(_slice_file(spec.shard, j)))
                self.build_trunk(slices=[(spec.shard, j)], eval_splits=False)
                parts.append(self.slice_trunk(spec.shard, j).subset(members["id"].tolist()))
            ids += members["id"].tolist()
            labels += members["label"].astype(int).tolist()
        trunk = TrunkCache.concat(parts)
        import torch

        val = self.trunk("val.safetensors")
        started = now()
        result = train_stage(self.backbone, trunk, trunk.ids, torch.tensor(labels, dtype=torch.long), spec.stage, parents,
                             spec.seed, len(self.label_names), val=(val, self.labels(val.ids)), on_batch=on_batch)
        data = canonical_bytes(result.state)
        staged = self.store.stage(spec.key, data)
        row = dict(key=spec.key, shard=spec.shard, prefix="-".join(map(str, spec.prefix)), stage=spec.stage,
                   parent_key=spec.parent_key, slice=spec.slice, slice_version=spec.slice_version,
                   prefix_versions=json.dumps(list(spec.prefix_versions)), sha256=hashlib.sha256(data).hexdigest(), n_train=len(trunk),
                   grad_example_steps=result.grad_example_steps, steps=result.steps, val_acc=result.val_acc,
                   seconds=result.seconds, started_at=started)
        cells = [(spec.shard, j, v) for j, v in zip(spec.prefix, spec.prefix_versions)]
        crash_point("before_checkpoint_record")
        recorded = self.ledger.record_checkpoint(row, cells, place_file=staged.place)
        self._forget_cache()
        if not recorded:
            staged.discard()
            return None
        row = {**row, "epoch_losses": result.epoch_losses, "epoch_accuracies": result.epoch_accuracies, "ended_at": now()}
        self.publisher.stage_trained(self, row)
        return row

    def stale_chains(self, versions=None, rows=None) -> dict[tuple[int, int], list[StageSpec]]:
        """(shard, sequence) -> its stages without an intact checkpoint under the current data, stage by stage
        (a stage shared by two sequences' prefixes is listed in both)."""
        rows = self.checkpoint_rows() if rows is None else rows
        out: dict[tuple[int, int], list[StageSpec]] = {}
        for spec in self.stage_specs(versions):
            if not self._intact(spec.key, rows):
                out.setdefault((spec.shard, spec.seq), []).append(spec)
        return out

    def chain_costs(self, chains: dict[tuple[int, int], list[StageSpec]]) -> dict[tuple[int, int], int]:
        """Example-steps to retrain each chain: live examples of every stage's prefix times the epochs."""
        counts = self.ledger.slice_counts().set_index(["shard", "slice"])["n_live"].to_dict()
        return {c: sum(sum(int(counts.get((s.shard, j), 0)) for j in s.prefix) * self.cfg.epochs for s in specs)
                for c, specs in chains.items()}

    def train(self, policy: str = "all", budget: int | None = None) -> TrainReport:
        """Train the missing stages of the chains the retraining `policy` picks (s3t_ops/policy.py; `all`: every
        missing stage; unchanged prefixes keep their checkpoints), within `budget` example-steps if given.
        A stage whose data was deleted while it trained is discarded and the new version trained instead;
        deletions are marked retrained only once no stage awaits retraining."""
        from s3t_ops.policy import select_chains

        t0 = time.perf_counter()
        report = TrainReport()
        report.reused = len({s.key for s in self.stage_specs()}) - len(self.missing_stages())
        chains = self.stale_chains()
        chosen = set(select_chains(self.chain_costs(chains), policy, budget))
        report.deferred = len(chains) - len(chosen)
        for _round in range(5):
            todo, seen = [], set()
            for (s, q), specs in self.stale_chains().items():
                if (s, q) in chosen:
                    todo += [x for x in specs if x.key not in seen]
                    seen.update(x.key for x in specs)
            todo.sort(key=lambda x: (x.stage, x.shard, x.seq))
            if not todo:
                break
            counts = self.ledger.slice_counts().set_index(["shard", "slice"])["n_live"].to_dict()
            work = sum(sum(int(counts.get((s.shard, j), 0)) for j in s.prefix) * self.cfg.epochs for s in todo)
            with self._bar(work, "training stages") as bar:
                for spec in todo:
                    bar.set_postfix_str(f"shard {spec.shard} seq {spec.seq} stage {spec.stage}")
                    try:
                        row = self.train_one(spec, on_batch=bar.update)
                    except StaleStage:
                        report.skipped += 1
                        continue
                    if row is None:
                        report.discarded += 1
                        continue
                    report.trained.append(spec)
                    report.grad_example_steps += row["grad_example_steps"]
        else:
            raise StateError("deletions kept invalidating the stages being trained; run `s3t train` again")
        self.ledger.mark_retrained(self._stale_in)
        report.seconds = time.perf_counter() - t0
        return report

    def materialize_stage(self, shard: int, seq: int, stage: int, on_batch=None) -> tuple[dict, bool]:
        """Stage `stage` of (shard, seq) under the current data: (checkpoint row, reused?). One Dagster partition."""
        spec = next((x for x in self.stage_specs() if (x.shard, x.seq, x.stage) == (shard, seq, stage)), None)
        if spec is None:
            raise StateError(f"no stage {stage} of sequence {seq} in shard {shard} for this config")
        rows = self.checkpoint_rows()
        if self._intact(spec.key, rows):
            return dict(rows[spec.key]), True
        row = self.train_one(spec, on_batch=on_batch)
        if row is None:
            raise StateError(f"stage {stage} of shard {shard}, sequence {seq}: its data or parent changed while it trained "
                             "(a deletion); nothing was recorded, it will retrain")
        self.ledger.mark_retrained(self._stale_in)  # the last stale stage of every door stamps the deletions retrained
        return row, False

    # --- lifecycle: fit / retrain -------------------------------------------------------------
    def fit(self, policy: str = "all", budget: int | None = None) -> TrainReport:
        """Cache the trunk, train the missing stages the policy picks (all by default), serve and publish the plan."""
        self.build_trunk()
        report = self.train(policy, budget)
        self.serve()
        return report

    retrain = fit

    # --- planning and serving ---------------------------------------------------------------
    def plan_for(self, versions: dict[tuple[int, int], str], rows: dict[str, dict],
                 sequences: Iterable[int] | None = None) -> tuple[ServingPlan, dict[int, list[str]]]:
        """Longest prefix with intact checkpoints under `versions`, per shard (ties: validation accuracy).
        `sequences` restricts the choice to some of the trained sequences (e.g. [0]: S3T with B = 1, whose
        only sequence is the first one, reusing its checkpoints)."""
        keep = None if sequences is None else set(sequences)
        by_seq: dict[tuple[int, int], list[StageSpec]] = {}
        for spec in self.stage_specs(versions):
            if keep is None or spec.seq in keep:
                by_seq.setdefault((spec.shard, spec.seq), []).append(spec)
        depths, scores, keys = {}, {}, {}
        for (s, q), chain in by_seq.items():
            d = 0
            for spec in chain:
                if not self._intact(spec.key, rows):
                    break
                d = spec.stage
                val = rows[spec.key]["val_acc"]
                scores[(s, q, d)] = float(val) if val is not None and not pd.isna(val) else float("-inf")
            depths[(s, q)] = d
            keys[(s, q)] = [c.key for c in chain[:d]]
        plan = serving_plan(self.cfg.shards, depths, scores)
        return plan, {c.shard: keys[(c.shard, c.seq)] for c in plan.choices}

    def current_plan(self, sequences: Iterable[int] | None = None) -> tuple[ServingPlan, dict[int, list[str]]]:
        return self.plan_for(self.ledger.slice_versions(self.cfg.shards, self.cfg.slices), self.checkpoint_rows(), sequences)

    def _record(self, plan: ServingPlan, keys: dict[int, list[str]], rows: dict[str, dict]) -> dict:
        """A served plan as the ledger and the registry keep it; `sha256` lets every door verify each file it loads."""
        return {"plan": plan.to_dict(), "checkpoints": {str(s): k for s, k in keys.items()},
                "sequences": [list(p) for p in self.sequences],
                "sha256": {k: rows[k]["sha256"] for ks in keys.values() for k in ks}}

    def _plan_in(self, con) -> tuple[dict, int]:
        """The plan under the slice versions seen by `con` (inside the honour transaction)."""
        versions = self.ledger.slice_versions(self.cfg.shards, self.cfg.slices, con=con)
        rows = self.checkpoint_rows(con)
        plan, keys = self.plan_for(versions, rows)
        return self._record(plan, keys, rows), len(plan.choices)

    def serve(self, publish: bool = True) -> tuple[int, ServingPlan]:
        """Record the current plan as the served one (unless it is already), then publish it (unless told not to)."""
        with self.ledger.transaction() as con:
            record, n_live = self._plan_in(con)
            latest = con.execute("SELECT plan_id, plan FROM plans ORDER BY plan_id DESC LIMIT 1").fetchall()
            unhonoured = con.execute("SELECT count(*) FROM deletions WHERE honoured_at IS NULL").fetchall()[0][0]
            if latest and json.loads(latest[0][1]) == json.loads(json.dumps(record)) and not unhonoured:
                pid = int(latest[0][0])
            else:
                pid = self.ledger.record_plan(record, n_live, con)
        if publish:
            self.publish()
        return pid, ServingPlan.from_dict(record["plan"])

    def publish(self) -> int | None:
        """Tell the publisher about the latest plan if it has not heard of it (idempotent; resumes after a crash)."""
        with self.ledger.locked():  # one publisher at a time: a plan gets one registry version
            latest = self.served()
            if latest is None:
                return None
            pid, record = latest
            published_at, version = self.ledger.publication(pid)
            if published_at is None:
                version = self.publisher.plan_served(self, pid, record)
                if version is not None or not self.publisher.registers:
                    self.ledger.mark_published(pid, version)
            return version

    def served(self) -> tuple[int, dict] | None:
        return self.ledger.latest_plan()

    def served_plan(self) -> ServingPlan | None:
        latest = self.served()
        return None if latest is None else ServingPlan.from_dict(latest[1]["plan"])

    def load_checkpoint(self, key: str) -> dict:
        rows = self.checkpoint_rows()
        if key not in rows:
            raise IntegrityError(f"checkpoint {key} has no live ledger row (purged or never recorded)")
        return self.store.load(key, rows[key]["sha256"])

    def ensemble(self, record: dict | None = None) -> "Ensemble":
        from s3t_ops.ensemble import Ensemble, ShardModel

        if record is None:
            latest = self.served()
            if latest is None:
                raise StateError("no plan has been served yet; run training first")
            record = latest[1]
        models = [ShardModel(int(s), len(keys), [self.load_checkpoint(k) for k in keys])
                  for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]
        return Ensemble(self.backbone, models, len(self.label_names))

    def evaluate(self, split: str = "test", record: dict | None = None) -> float:
        trunk = self.trunk(f"{split}.safetensors")
        logits = self.ensemble(record).logits_from_trunk(trunk)
        return float((logits.argmax(-1) == self.labels(trunk.ids)).float().mean())

    def majority_accuracy(self, split: str = "test") -> float:
        train = self.ledger.examples("train")
        majority = int(train["label"].mode().iloc[0])
        ev = self.ledger.examples(split)
        return float((ev["label"] == majority).mean())

    # --- lifecycle: forget ------------------------------------------------------------------
    def forget(self, ids: Iterable[str]) -> ForgetReport:
        """Honour deletions at once (one ledger transaction: no gradient step, a new plan over checkpoints
        that never saw them), move the registry's champion, then erase their data everywhere.

        Erasure of the state's own files never waits on the registry: when the registry fails, the deletion is
        still honoured and erased locally, then PublishError says so (the next command retries the registry)."""
        from s3t_ops.erasure import erase_pending
        from s3t_ops.publish import PublishError

        t0 = time.perf_counter()
        receipt = self.ledger.honour(ids, self._plan_in, request=self.tags.get("dagster_run_id"))
        self._forget_cache()
        honour = time.perf_counter() - t0
        failed = None
        try:
            version = self.publish()
        except PublishError as exc:
            version, failed = None, exc
        published = time.perf_counter() - t0
        moved_at = time.time() if version is not None else None
        t1 = time.perf_counter()
        purged = self.purge_stale()
        erased = erase_pending(self)
        plan = ServingPlan.from_dict(receipt.record["plan"]) if receipt.record else None
        report = ForgetReport(receipt.new, receipt.already, receipt.dirty, receipt.plan_id, plan, honour,
                              published - honour, time.perf_counter() - t1, purged, version, moved_at)
        reason = str(failed) if failed is not None else erased.registry_error
        if reason:
            raise PublishError(f"{len(receipt.new)} example(s) forgotten: honoured by plan {receipt.plan_id} and erased from the "
                               f"state's files, but {reason}", report=report)
        return report

    def purge_stale(self) -> int:
        """Delete checkpoints no longer valid under the current data (their lineage holds a deleted id);
        never one the latest plan serves."""
        with self.ledger.locked():
            current = {s.key for s in self.stage_specs()}
            served = self.served()
            keep = {k for keys in (served[1]["checkpoints"].values() if served else []) for k in keys}
            stale = [k for k in self.checkpoint_rows() if k not in current and k not in keep]
            if not stale:
                return 0
            for i, k in enumerate(stale):  # their MLflow stage runs go with the registry's erasure (erasure.py)
                self.store.delete(k)
                if i == 0:
                    crash_point("during_purge")
            self.ledger.mark_purged(stale, "stale: trained on a deleted example")
            self._forget_cache()
        return len(stale)

    def deletions_after(self, seen: int) -> tuple[int, list[tuple[int, int]], list[str]]:
        """(deletions so far, training cells touched by those after the first `seen`, the requests they came
        from, e.g. Dagster run ids): deletions are append-only, so a count is a cursor (the deletion sensor's)."""
        dels = self.ledger.deletions()
        new = dels.iloc[seen:]
        cells = sorted({(int(r.shard), int(r.slice)) for r in new.itertuples() if r.split == "train"})
        return len(dels), cells, sorted({str(r) for r in new["request"].dropna()})

    def stale_partitions(self) -> dict[int, list[tuple[int, int]]]:
        """Stage -> (shard, sequence) partitions awaiting retraining (shared prefixes counted for every sequence)."""
        rows = self.checkpoint_rows()
        out: dict[int, list[tuple[int, int]]] = {k: [] for k in range(1, self.cfg.slices + 1)}
        for spec in self.stage_specs():
            if not self._intact(spec.key, rows):
                out[spec.stage].append((spec.shard, spec.seq))
        return out

    def audit(self, record: dict | None = None) -> dict[str, set[str]]:
        """Exactness audit: served checkpoint key -> tombstones of deleted examples in its lineage ({} = exact)."""
        if record is None:
            latest = self.served()
            record = latest[1] if latest else {"checkpoints": {}}
        deleted = self.ledger.deleted()
        bad = {}
        for keys in record["checkpoints"].values():
            for k in keys:
                hit = self.ledger.lineage(k) & deleted
                if hit:
                    bad[k] = hit
        return bad

    # --- repair -----------------------------------------------------------------------------
    def repair(self, check_registry: bool = False) -> RepairReport:
        from s3t_ops.repair import repair

        return repair(self, check_registry)


SERVER_FILES = ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlartifacts")  # what `mlflow ui` makes
MOVING = ".s3t-moving-in-"


def _server_files(root: Path) -> list[str]:
    """The entries of an existing state folder to be, all made by our own servers (else StateError). Leftovers of a
    creation that died while moving in (its marker names a dead process) are removed first."""
    if not root.is_dir():
        return []
    for marker in root.glob(f"{MOVING}*"):
        pid = marker.name.removeprefix(MOVING)
        if pid.isdigit() and not _alive(int(pid)) and not (root / CONFIG_FILE).exists():
            for name in marker.read_text().split():
                target = root / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
    names = sorted(p.name for p in root.iterdir())
    foreign = [n for n in names if n not in SERVER_FILES]
    if foreign:
        raise StateError(f"{root} already holds files ({', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}); "
                         "choose another --state folder or remove it")
    return names


def _move_in(tmp: Path, root: Path) -> None:
    """Move a built state into a folder that holds a server's store: every entry, config.json last (the commit),
    with a marker listing them so that a crash in between is undone by the next creation."""
    entries = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG_FILE and not (root / p.name).exists())
    marker = root / f"{MOVING}{os.getpid()}"
    marker.write_text("\n".join(entries))
    for name in entries:
        os.rename(tmp / name, root / name)
    os.rename(tmp / CONFIG_FILE, root / CONFIG_FILE)
    marker.unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    from s3t_ops.files import alive

    return alive(pid)


def prepare_registry(settings: dict, folder: Path, final_root: Path, state_id: str) -> None:
    """At creation: the state's own MLflow store is created in `folder` with its schema migrated (once, here: never
    by parallel first users later), unless the final folder already holds one (a server started first); with any
    store, the registered model name is checked to be free or this state's before anything else is written."""
    if settings.get("kind") != "mlflow":
        return
    from s3t_ops.publish import PublishError
    from s3t_ops.registry import ForeignModelError, Tracker, default_artifact_root

    uri = settings.get("tracking_uri")
    if not uri:
        db = final_root / "mlflow.db" if (final_root / "mlflow.db").exists() else folder / "mlflow.db"
        uri = f"sqlite:///{db}"
    try:
        tracker = Tracker(uri, settings.get("experiment") or "s3t", settings.get("model_name") or "s3t-ensemble",
                          default_artifact_root(final_root), state_id)
        tracker.check_owner()
    except ForeignModelError as exc:
        raise StateError(str(exc)) from None
    except Exception as exc:  # MLflow raises many types (HTTP, SQL, IO)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"MLflow registry at {uri}: creating the state's store failed ({first})") from exc


def _remove_abandoned_creations(parent: Path, name: str) -> None:
    """Hidden folders of creations whose process died (a crash during ingest)."""
    for p in parent.glob(f".{name}{CREATING}*"):
        pid = p.name.rsplit(CREATING, 1)[-1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(p, ignore_errors=True)


__all__ = ["S3T", "StageSpec", "TrainReport", "ForgetReport", "RepairReport", "StateError", "LedgerError"]

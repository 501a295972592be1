"""One state folder, as every room of the engine receives it: config, ledger, storage, checkpoints, trunk cache,
publisher, and the queries every room shares.

The rooms (opening, training, serving, forgetting, repair, erasure) receive a `State` and never the engine facade
(engine.py), so data flows down: nothing below calls back up. A state folder holds config.json, secret.key
(tombstone key), ledger.duckdb, mlflow.db and mlartifacts/ (the default registry), memorization/ (approximate
unlearning artifacts). The data files are in the state's `Storage` (`cfg.storage_url`; by default the state
folder itself): trunk/, slices/ (datafiles.py) and checkpoints/ (checkpoints.py).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd

from s3t_ops.checkpoints import CheckpointFiles, IntegrityError
from s3t_ops.config import S3TConfig
from s3t_ops.datafiles import DataFiles, slice_file, slice_of, slice_parquet, trunk_file
from s3t_ops.ledger import Ledger
from s3t_ops.publish import Publisher
from s3t_ops.registry import default_publisher
from s3t_ops.sequences import select_sequences
from s3t_ops.storage import Storage

if TYPE_CHECKING:
    import torch

    from s3t_ops.backbone import Backbone
    from s3t_ops.trunk import TrunkCache

CONFIG_FILE = "config.json"
SCRATCH = ".staging"  # local staging of files bound for a non-local storage (s3t_ops/storage.py)



class Eraser(Protocol):
    """Files built from examples outside the trunk and slices (e.g. memorization artifacts), as erasure sees them:
    whoever keeps such files gives the state an eraser (engine.py registers them), so erasure reaches them without
    knowing what they are."""

    run_tag: str  # registry runs that describe one of its artifacts name it under this tag

    def erase(self, storage: Storage, is_deleted: Callable[[str], bool]) -> list[str]:
        """Remove every file built from a deleted id; returns the names of what was removed."""

    def alive(self, storage: Storage, name: str) -> bool:
        """Whether the named artifact is still whole (registry runs describing a removed one are erased too)."""


class StateError(RuntimeError):
    """The state folder is missing, already used, or inconsistent."""


class StaleStage(StateError):
    """A stage's data or parent changed (a deletion) since its spec was computed: recompute what is missing."""


class State:
    """One state folder, opened: what the rooms read and write, and the caches they share."""

    def __init__(self, cfg: S3TConfig, backbone: "Backbone | None" = None, progress: bool = True,
                 publisher: Publisher | None = None, erasers: Iterable[Eraser] = ()):
        if backbone is not None and backbone.cfg.training_fingerprint() != cfg.training_fingerprint():
            # stages read the stage model and hyper-parameters from the backbone's config: another config's
            # backbone would train other stages under this state's keys
            raise StateError(f"the backbone given was built for another config than the state in {cfg.state_dir}")
        self.cfg = cfg
        self.root = Path(cfg.state_dir)
        self.ledger = Ledger(self.root / "ledger.duckdb")
        self.storage = Storage(cfg.storage_url or cfg.state_dir, scratch=self.root / SCRATCH)
        self.checkpoints = CheckpointFiles(self.storage)
        self.data_files = DataFiles(self.storage, self.ledger)
        self.sequences = select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior)
        self.progress = progress
        self.erasers = list(erasers)
        self.tags: dict[str, str] = {}  # added to registry runs and versions (e.g. the Dagster run id)
        self._backbone = backbone
        self._publisher = publisher
        self._label_names: list[str] | None = None
        self._label_map: dict[str, int] = {}
        self._backbone_fp: str | None = None
        self._rows: dict[str, dict] | None = None
        self._trunks: dict[str, tuple[Hashable, "TrunkCache"]] = {}  # name -> (storage stamp, cache)

    # --- what it is made of, loaded when first needed ------------------------------------------
    @property
    def publisher(self) -> Publisher:
        """The registry recorded in the ledger when the state was created (every door publishes there)."""
        if self._publisher is None:
            self._publisher = default_publisher(self.ledger.get_meta("registry"), self.root, self.ledger.get_meta("state_id"))
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

    def bar(self, total: int | None, desc: str, unit: str = "ex"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False, dynamic_ncols=True)

    # --- the data -------------------------------------------------------------------------------
    def examples(self, split: str | None = None) -> pd.DataFrame:
        """Live examples: id, text, label, split, shard, slice."""
        return self.ledger.examples(split)

    def labels(self, ids: list[str]) -> "torch.Tensor":
        """Label tensor of live examples, in the order given."""
        import torch

        if any(i not in self._label_map for i in ids):
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

    # --- the trunk cache --------------------------------------------------------------------------
    def build_trunk(self, slices: Iterable[tuple[int, int]] | None = None, eval_splits: bool = True) -> int:
        """Compute the frozen hidden states of live examples not cached yet, or whose file is damaged (all training
        slices, or the ones named; val and test unless told not to). Returns the examples computed."""
        from s3t_ops.trunk import compute_trunk

        wanted = None if slices is None else set(slices)
        todo: list[tuple[str, pd.DataFrame]] = []
        train = self.ledger.examples("train")
        for (s, j), part in train.groupby(["shard", "slice"]):
            if wanted is None or (int(s), int(j)) in wanted:
                todo.append((slice_file(int(s), int(j)), part))
        if eval_splits:
            for split in ("val", "test"):
                todo.append((f"{split}.safetensors", self.ledger.examples(split)))
        todo = [(n, p) for n, p in todo if not self.data_files.intact(trunk_file(n))]
        total = sum(len(p) for _, p in todo)
        with self.bar(total, "trunk (frozen backbone, once per example)") as bar:
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
                cell = slice_of(name)
                self.build_trunk(slices=[cell] if cell else [], eval_splits=cell is None)
                stamp = self.storage.stamp(rel)
            self._trunks[name] = (stamp, TrunkCache.load(self.storage, rel))
        return self._trunks[name][1]

    def slice_trunk(self, shard: int, slc: int) -> "TrunkCache":
        return self.trunk(slice_file(shard, slc))

    def materialize_slice(self, shard: int, slc: int) -> dict:
        """One slice's live members as Parquet (the pipeline's slice_data) plus its trunk cache."""
        import io

        self.build_trunk(slices=[(shard, slc)], eval_splits=False)
        members = self.ledger.members(shard, slc)
        buf = io.BytesIO()
        members.to_parquet(buf, index=False)
        location = self.data_files.write(slice_parquet(shard, slc), buf.getvalue())
        return {"shard": shard, "slice": slc, "version": self.ledger.keyring.slice_version(members["id"]),
                "n_live": len(members), "path": location, "trunk_rows": len(self.slice_trunk(shard, slc)),
                "ids": set(members["id"])}

    # --- checkpoints and plans --------------------------------------------------------------------
    def checkpoint_rows(self, con=None) -> dict[str, dict]:
        """Live checkpoint rows by key (cached until `forget_rows`: whoever writes checkpoint rows calls it)."""
        if con is not None or self._rows is None:
            rows = self.ledger.checkpoints(con=con).astype(object)
            rows = rows.where(rows.notna(), None)
            out = {r["key"]: r for r in rows.to_dict("records")}
            if con is not None:
                return out
            self._rows = out
        return self._rows

    def forget_rows(self) -> None:
        self._rows = None

    def intact(self, key: str, rows: dict[str, dict]) -> bool:
        """A live row, and its file holding the bytes the row names."""
        return key in rows and self.checkpoints.intact(key, rows[key]["sha256"])

    def load_checkpoint(self, key: str) -> dict:
        rows = self.checkpoint_rows()
        if key not in rows:
            raise IntegrityError(f"checkpoint {key} has no live ledger row (purged or never recorded)")
        return self.checkpoints.load(key, rows[key]["sha256"])

    def served(self) -> tuple[int, dict] | None:
        """(plan id, record) of the plan in force: the latest the ledger recorded."""
        return self.ledger.latest_plan()

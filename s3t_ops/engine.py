"""The S3T operations that both doors (CLI and Dagster assets) call: ingest, trunk, train, plan, forget, evaluate.

State lives in one folder (`cfg.state_dir`): config.json, ledger.duckdb, trunk/ (cached frozen hidden
states, per training slice), checkpoints/ (content-addressed stage checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from s3t_ops.backbone import Backbone
from s3t_ops.checkpoints import CheckpointStore, root_key, stage_key, stage_seed
from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.data import build_dataset, load_source
from s3t_ops.ensemble import Ensemble, ShardModel
from s3t_ops.ledger import Ledger
from s3t_ops.partition import assign, slice_version
from s3t_ops.planner import ServingPlan, serving_plan
from s3t_ops.sequences import select_sequences
from s3t_ops.stages import train_stage
from s3t_ops.trunk import TrunkCache, compute_trunk

CONFIG_FILE = "config.json"


class StateError(RuntimeError):
    """The state folder is missing, already used, or inconsistent."""


@dataclass(frozen=True)
class StageSpec:
    """One stage under the current data: stage k of sequence q of shard s, and its content key."""

    shard: int
    seq: int
    prefix: tuple[int, ...]
    key: str
    parent_key: str | None
    slice_version: str
    seed: int

    @property
    def stage(self) -> int:
        return len(self.prefix)

    @property
    def slice(self) -> int:
        return self.prefix[-1]


@dataclass
class TrainReport:
    trained: list[StageSpec] = field(default_factory=list)
    reused: int = 0
    grad_example_steps: int = 0
    seconds: float = 0.0


@dataclass
class ForgetReport:
    new: tuple[str, ...]
    already: tuple[str, ...]
    dirty: tuple[tuple[int, int], ...]
    plan_id: int
    plan: ServingPlan
    honour_seconds: float  # request received -> new plan recorded
    erase_seconds: float  # cached hidden states rewritten, stale checkpoints deleted
    purged_checkpoints: int
    grad_example_steps: int = 0  # honouring never trains


def _slice_file(shard: int, slc: int) -> str:
    return f"train-s{shard}-j{slc}.safetensors"


class S3T:
    def __init__(self, cfg: S3TConfig, backbone: Backbone | None = None, progress: bool = True):
        self.cfg = cfg
        self.root = Path(cfg.state_dir)
        self.ledger = Ledger(self.root / "ledger.duckdb")
        self.store = CheckpointStore(self.root / "checkpoints")
        self.trunk_dir = self.root / "trunk"
        self._backbone = backbone
        self._trunks: dict[str, TrunkCache] = {}
        self.progress = progress
        self._label_names: list[str] | None = None
        self._backbone_fp: str | None = None
        self.sequences = select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior)

    # --- state ------------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | Path, backbone: Backbone | None = None, progress: bool = True) -> "S3T":
        path = Path(state_dir) / CONFIG_FILE
        if not path.is_file():
            raise StateError(f"no S3T state in {state_dir} (missing {CONFIG_FILE}); run `s3t demo` or `s3t train` first")
        data = json.loads(path.read_text())
        data["state_dir"] = str(state_dir)
        return cls(S3TConfig.from_dict(data), backbone, progress)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = Backbone(self.cfg)
        return self._backbone

    @property
    def label_names(self) -> list[str]:
        if self._label_names is None:
            self._label_names = list(self.ledger.get_meta("label_names"))
        return self._label_names

    def _bar(self, total: int, desc: str, unit: str = "ex") -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False, dynamic_ncols=True)

    # --- ingest -----------------------------------------------------------------------------
    def ingest(self, source: str | Path | None = None) -> dict[str, int]:
        """Read the source, assign (shard, slice) and write the ledger; the config file is written last."""
        if (self.root / CONFIG_FILE).exists() or self.ledger.exists():
            raise StateError(f"{self.root} already holds an S3T state; choose another --state folder or remove it")
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
        try:
            self.ledger.init()
            self.ledger.add_examples(frame)
            self.ledger.set_meta("label_names", list(ds.label_names))
            self.ledger.set_meta("source", str(source or "tweets"))
        except BaseException:
            self.ledger.path.unlink(missing_ok=True)
            raise
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        os.replace(tmp, self.root / CONFIG_FILE)
        return frame["split"].value_counts().to_dict()

    # --- trunk ------------------------------------------------------------------------------
    def _trunk_path(self, name: str) -> Path:
        return self.trunk_dir / name

    def build_trunk(self, slices: Iterable[tuple[int, int]] | None = None, eval_splits: bool = True) -> int:
        """Compute the frozen hidden states of live examples not cached yet (all slices, or the ones named)."""
        wanted = None if slices is None else set(slices)
        todo: list[tuple[str, pd.DataFrame]] = []
        train = self.ledger.examples("train")
        for (s, j), part in train.groupby(["shard", "slice"]):
            if wanted is None or (int(s), int(j)) in wanted:
                todo.append((_slice_file(int(s), int(j)), part))
        if eval_splits:
            for split in ("val", "test"):
                todo.append((f"{split}.safetensors", self.ledger.examples(split)))
        todo = [(n, p) for n, p in todo if not self._trunk_path(n).is_file()]
        total = sum(len(p) for _, p in todo)
        with self._bar(total, "trunk (frozen backbone, once per example)") as bar:
            for name, part in todo:
                cache = compute_trunk(self.backbone, part["id"].tolist(), part["text"].tolist(), progress=bar.update)
                cache.save(self._trunk_path(name))
                self._trunks.pop(name, None)
        return total

    def materialize_slice(self, shard: int, slc: int) -> dict:
        """One slice's live members as Parquet (training reads files, not the ledger) plus its trunk cache."""
        self.build_trunk(slices=[(shard, slc)], eval_splits=False)
        train = self.ledger.examples("train")
        members = train[(train["shard"] == shard) & (train["slice"] == slc)][["id", "label"]].reset_index(drop=True)
        path = self._slice_parquet(shard, slc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        members.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        cached = set(self.slice_trunk(shard, slc).ids)
        return {"shard": shard, "slice": slc, "version": slice_version(members["id"]), "n_live": len(members),
                "path": str(path), "trunk_rows": len(cached), "ids": set(members["id"])}

    def _slice_parquet(self, shard: int, slc: int) -> Path:
        return self.root / "slices" / f"s{shard}-j{slc}.parquet"

    def _prefix_labels(self, shard: int, prefix: tuple[int, ...], ids: list[str]) -> torch.Tensor:
        """Labels from the slices' Parquet files when the pipeline wrote them (no ledger connection while
        training under a multiprocess executor), else from the ledger."""
        paths = [self._slice_parquet(shard, j) for j in prefix]
        if not all(p.is_file() for p in paths):
            return self._labels(ids)
        frame = pd.concat([pd.read_parquet(p) for p in paths])
        label = dict(zip(frame["id"], frame["label"].astype(int)))
        missing = [i for i in ids if i not in label]
        if missing:
            raise StateError(f"slice files of shard {shard} lack {len(missing)} cached example(s); re-materialize slice_data")
        return torch.tensor([label[i] for i in ids], dtype=torch.long)

    def materialize_stage(self, shard: int, seq: int, stage: int, on_batch=None) -> tuple[dict, bool]:
        """Stage `stage` of (shard, seq) under the current data: (checkpoint row, reused?)."""
        spec = next((x for x in self.stage_specs() if (x.shard, x.seq, x.stage) == (shard, seq, stage)), None)
        if spec is None:
            raise StateError(f"no stage {stage} of sequence {seq} in shard {shard} for this config")
        rows = self._checkpoint_rows()
        if spec.key in rows and self.store.exists(spec.key):
            return dict(rows[spec.key]), True
        return self.train_one(spec, on_batch=on_batch), False

    def trunk(self, name: str) -> TrunkCache:
        if name not in self._trunks:
            path = self._trunk_path(name)
            if not path.is_file():
                raise StateError(f"trunk cache {path} is missing; run the trunk step first")
            self._trunks[name] = TrunkCache.load(path)
        return self._trunks[name]

    def slice_trunk(self, shard: int, slc: int) -> TrunkCache:
        return self.trunk(_slice_file(shard, slc))

    # --- stages -----------------------------------------------------------------------------
    def stage_specs(self, versions: dict[tuple[int, int], str] | None = None) -> list[StageSpec]:
        """Every (shard, sequence, stage) under the current slice versions, ordered stage by stage."""
        versions = versions or self.ledger.slice_versions(self.cfg.shards, self.cfg.slices)
        n_labels = len(self.label_names)
        specs = []
        for s in range(self.cfg.shards):
            root = root_key(self.cfg.training_fingerprint(), self.backbone_fingerprint(), s, n_labels)
            for q, perm in enumerate(self.sequences):
                parent = root
                for k in range(1, self.cfg.slices + 1):
                    prefix = tuple(perm[:k])
                    v = versions[(s, prefix[-1])]
                    key = stage_key(parent, prefix[-1], v, k)
                    specs.append(StageSpec(s, q, prefix, key, None if k == 1 else parent, v, stage_seed(self.cfg.seed, s, prefix)))
                    parent = key
        return sorted(specs, key=lambda x: (x.stage, x.shard, x.seq))

    def backbone_fingerprint(self) -> str:
        """Recorded at first use, so later commands need not load the backbone to compute keys."""
        if self._backbone_fp is None:
            fp = self.ledger.get_meta("backbone_fingerprint") if self.ledger.exists() else None
            if fp is None:
                fp = self.backbone.fingerprint
                self.ledger.set_meta("backbone_fingerprint", fp)
            self._backbone_fp = str(fp)
        return self._backbone_fp

    def missing_stages(self) -> list[StageSpec]:
        """Stages whose content key has no checkpoint (deduplicated: shared prefixes train once)."""
        seen, out = set(), []
        for spec in self.stage_specs():
            if spec.key not in seen and not self.store.exists(spec.key):
                out.append(spec)
            seen.add(spec.key)
        return out

    def train_one(self, spec: StageSpec, on_batch=None) -> dict:
        """Train and store one stage checkpoint (its parent must exist)."""
        parents = []
        key = spec.parent_key
        chain = []
        while key is not None:
            chain.append(key)
            row = self._checkpoint_rows().get(key)
            if row is None:
                raise StateError(f"parent checkpoint {key} of stage {spec.stage} (shard {spec.shard}) is missing; train earlier stages first")
            key = row["parent_key"]
        parents = [self.store.load(k) for k in reversed(chain)]
        trunk = TrunkCache.concat([self.slice_trunk(spec.shard, j) for j in spec.prefix])
        labels = self._prefix_labels(spec.shard, spec.prefix, trunk.ids)
        val = self.trunk("val.safetensors")
        result = train_stage(self.backbone, trunk, trunk.ids, labels, spec.stage, parents, spec.seed,
                             len(self.label_names), val=(val, self._labels(val.ids)), on_batch=on_batch)
        path = self.store.save(spec.key, result.state, metadata={"shard": str(spec.shard), "prefix": "-".join(map(str, spec.prefix))})
        row = dict(key=spec.key, shard=spec.shard, prefix="-".join(map(str, spec.prefix)), stage=spec.stage,
                   parent_key=spec.parent_key, slice=spec.slice, slice_version=spec.slice_version, path=str(path),
                   n_train=len(trunk), grad_example_steps=result.grad_example_steps, steps=result.steps,
                   val_acc=result.val_acc, seconds=result.seconds)
        self.ledger.record_checkpoint(row)
        self._ckpt_cache = None
        return {**row, "epoch_losses": result.epoch_losses, "epoch_accuracies": result.epoch_accuracies}

    def train(self) -> TrainReport:
        """Materialize every missing stage; unchanged prefixes keep their checkpoints."""
        t0 = time.perf_counter()
        report = TrainReport()
        todo = self.missing_stages()
        report.reused = len({s.key for s in self.stage_specs()}) - len(todo)
        work = sum(self._n_prefix(s) * self.cfg.epochs for s in todo)
        with self._bar(work, "training stages") as bar:
            for spec in todo:
                bar.set_postfix_str(f"shard {spec.shard} seq {spec.seq} stage {spec.stage}")
                row = self.train_one(spec, on_batch=bar.update)
                report.trained.append(spec)
                report.grad_example_steps += row["grad_example_steps"]
        if todo:
            self.ledger.mark_retrained()
        report.seconds = time.perf_counter() - t0
        return report

    def _n_prefix(self, spec: StageSpec) -> int:
        counts = self.ledger.slice_counts().set_index(["shard", "slice"])["n_live"].to_dict()
        return sum(int(counts.get((spec.shard, j), 0)) for j in spec.prefix)

    _ckpt_cache: dict | None = None

    def _checkpoint_rows(self) -> dict[str, dict]:
        if self._ckpt_cache is None:
            rows = self.ledger.checkpoints().astype(object)
            rows = rows.where(rows.notna(), None)
            self._ckpt_cache = {r["key"]: r for r in rows.to_dict("records")}
        return self._ckpt_cache

    def _labels(self, ids: list[str]) -> torch.Tensor:
        if not hasattr(self, "_label_map") or any(i not in self._label_map for i in ids):
            ex = self.ledger.examples()
            self._label_map = dict(zip(ex["id"], ex["label"].astype(int)))
        return torch.tensor([self._label_map[i] for i in ids], dtype=torch.long)

    # --- planning and serving ---------------------------------------------------------------
    def current_plan(self) -> tuple[ServingPlan, dict[int, list[str]]]:
        """Longest prefix with checkpoints under the current data, per shard (ties: validation accuracy)."""
        rows = self._checkpoint_rows()
        specs = self.stage_specs()
        by_seq: dict[tuple[int, int], list[StageSpec]] = {}
        for spec in sorted(specs, key=lambda x: x.stage):
            by_seq.setdefault((spec.shard, spec.seq), []).append(spec)
        depths, scores, keys = {}, {}, {}
        for (s, q), chain in by_seq.items():
            d = 0
            for spec in chain:
                if spec.key not in rows or not self.store.exists(spec.key):
                    break
                d = spec.stage
                val = rows[spec.key]["val_acc"]
                scores[(s, q, d)] = float(val) if val is not None and not pd.isna(val) else float("-inf")
            depths[(s, q)] = d
            keys[(s, q)] = [c.key for c in chain[:d]]
        plan = serving_plan(self.cfg.shards, depths, scores)
        return plan, {c.shard: keys[(c.shard, c.seq)] for c in plan.choices}

    def serve(self) -> tuple[int, ServingPlan]:
        """Record the current plan as the served one; pending deletions are honoured by it."""
        plan, keys = self.current_plan()
        record = {"plan": plan.to_dict(), "checkpoints": {str(s): k for s, k in keys.items()}, "sequences": [list(p) for p in self.sequences]}
        pid = self.ledger.record_plan(record, len(plan.choices))
        self.ledger.mark_honoured(pid)
        return pid, plan

    def served(self) -> tuple[int, dict] | None:
        return self.ledger.latest_plan()

    def ensemble(self, record: dict | None = None) -> Ensemble:
        if record is None:
            latest = self.served()
            if latest is None:
                raise StateError("no plan has been served yet; run training first")
            record = latest[1]
        models = [ShardModel(int(s), len(keys), [self.store.load(k) for k in keys]) for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]
        return Ensemble(self.backbone, models, len(self.label_names))

    def evaluate(self, split: str = "test", record: dict | None = None) -> float:
        trunk = self.trunk(f"{split}.safetensors")
        logits = self.ensemble(record).logits_from_trunk(trunk)
        return float((logits.argmax(-1) == self._labels(trunk.ids)).float().mean())

    def majority_accuracy(self, split: str = "test") -> float:
        train = self.ledger.examples("train")
        majority = int(train["label"].mode().iloc[0])
        ev = self.ledger.examples(split)
        return float((ev["label"] == majority).mean())

    # --- deletion ---------------------------------------------------------------------------
    def forget(self, ids: Iterable[str]) -> ForgetReport:
        """Honour deletions at once: no gradient step, just a new plan over checkpoints that never saw them."""
        t0 = time.perf_counter()
        with self.ledger.session():  # one connection for the whole honour path
            receipt = self.ledger.forget(ids, compact=False)
            self._ckpt_cache = None
            served = self.served()
            if not receipt.new and served is not None:  # all already forgotten: the served plan honours them
                pid, plan = served[0], ServingPlan.from_dict(served[1]["plan"])
            else:
                pid, plan = self.serve()
        honour = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._erase(receipt.new, receipt.dirty)
        purged = self.purge_stale()
        return ForgetReport(receipt.new, receipt.already, receipt.dirty, pid, plan, honour, time.perf_counter() - t1, purged)

    def _erase(self, ids: Iterable[str], dirty: Iterable[tuple[int, int]]) -> None:
        gone = set(ids)
        if gone:
            self.ledger.compact()  # the deleted rows' bytes leave the DuckDB file
        names = [_slice_file(s, j) for s, j in dirty] + ["val.safetensors", "test.safetensors"]
        for name in names:
            path = self._trunk_path(name)
            if path.is_file():
                cache = self.trunk(name)
                if gone & set(cache.ids):
                    cache = cache.without(gone)
                    cache.save(path)
                    self._trunks[name] = cache

    def purge_stale(self) -> int:
        """Delete checkpoints no longer valid under the current data (their lineage holds a deleted id)."""
        current = {s.key for s in self.stage_specs()}
        stale = [k for k in self._checkpoint_rows() if k not in current]
        for k in stale:
            self.store.delete(k)
        self.ledger.mark_purged(stale)
        self._ckpt_cache = None
        return len(stale)

    def audit(self, record: dict | None = None) -> dict[str, set[str]]:
        """Exactness audit: served checkpoint key -> deleted ids in its lineage (empty dict = exact)."""
        if record is None:
            latest = self.served()
            record = latest[1] if latest else {"checkpoints": {}}
        deleted = self.ledger.deleted_ids()
        bad = {}
        for keys in record["checkpoints"].values():
            for k in keys:
                hit = self.ledger.lineage_ids(k) & deleted
                if hit:
                    bad[k] = hit
        return bad

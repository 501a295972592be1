"""Every file the memorization group keeps in a state's storage, and their erasure.

The artifacts live in the state's `Storage` (s3t_ops/storage.py, the root URL of the trunk cache and the
checkpoints: the state folder by default, or an object store), under `memorization/`, one folder (or
object prefix) per artifact:

  original-<key>/          the original model of one config and live training set (key: a hash of both)
                           model.safetensors, proxies.parquet, training.json
  scores/                  the `memorization_scores` asset: scores.parquet, scores.json
  unlearned/               the `rum_unlearned` asset: model.safetensors, unlearned.json
  report/                  the `unlearning_report` asset: report.json, report.png
  runs/<stamp>-<method>/   one `s3t unlearn` call: report.json, report.png (with an oracle), model.safetensors

Every artifact also holds `ids.json`: the sorted ids of every example its files were computed from (the
training set, plus the validation split where the holdout-retraining proxy fine-tuned on it and the test
split where accuracies and the MIA were measured on it). It is written first, so anything holding data
names its ids; `erase` reads nothing else. The files are always written into a local stage folder (safetensors,
Parquet and matplotlib write files), then committed whole, in the way the storage allows:

- local: the stage is a `.writing-<name>-<hex>` sibling, renamed into place once complete; readers never
  see half of an artifact, and a crash leaves either the old version or the new one. Leftovers:
    .writing-<name>-<hex>/   an artifact being written (or cut short)
    .replaced-<name>/        the previous version of a rewritten artifact, being removed
    .erasing-<name>/         an artifact being erased
- an object store (no rename): the stage is a local folder in the state folder's `.staging/` (named with the
  writer's pid; removed after the upload, and by repair when its writer died), uploaded as `ids.json` first, then the
  other files, then the empty marker `.complete` last. Readers take an artifact only with its marker, so a
  crash midway leaves an incomplete artifact that nothing reads, which `erase` removes whatever its ids (it
  is no version of anything). Removing an artifact, to erase it or before rewriting it, deletes the marker
  first and `ids.json` last, so every object left by a crash midway is still named by its ids and still
  incomplete. A rewrite removes the old version, then puts the new one: a reader in between finds none (the
  original model is then retrained, a later asset asks for its upstream one).

MLflow runs logged for an artifact carry the tag `ARTIFACT_TAG` = its name, its folder relative to
`memorization/` (`runs/<stamp>-<method>`, `report`): runs whose artifact is not `complete` are to be
hard-deleted (`erase` returns the names it removed; the registry also finds them by that absence).
The asset folders keep their name when rewritten, so erasing `report` names the runs of its earlier
versions too: more runs than strictly needed, never fewer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from s3t_ops.memorization.config import MemorizationConfig
from s3t_ops.storage import Storage, scratch_dir

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

State = dict[str, "torch.Tensor"]  # a model's tensors (what the artifacts hold; computing them is workflow.py's)

ARTIFACT_TAG = "s3t.memorization_artifact"
PREFIX = "memorization"
SCORES, UNLEARNED, REPORT, RUNS = "scores", "unlearned", "report", "runs"
IDS, COMPLETE = "ids.json", ".complete"
WRITING, REPLACED, ERASING = ".writing-", ".replaced-", ".erasing-"
MODEL, REPORT_JSON, REPORT_PNG = "model.safetensors", "report.json", "report.png"


def original_name(train_ids: list[str], mcfg: MemorizationConfig) -> str:
    """The artifact caching the original model of this config and live training set (in this order)."""
    key = hashlib.sha256(json.dumps({k: v for k, v in mcfg.to_dict().items() if k in ("depth", "epochs", "lr", "batch_size", "seed")},
                                    sort_keys=True).encode() + "|".join(train_ids).encode()).hexdigest()[:12]
    return f"original-{key}"


def run_name(group: str, method: str) -> str:
    return f"{RUNS}/{group}-{method}"


def location(storage: Storage, name: str, file: str | None = None) -> str:
    """Where an artifact (or one of its files) is, for results and messages: a local path or a URL."""
    return storage.location(f"{PREFIX}/{name}" + (f"/{file}" if file else ""))


def complete(storage: Storage, name: str) -> bool:
    """The artifact is there whole (locally its folder exists: it was renamed into place complete)."""
    if storage.local:
        return storage.local_path(f"{PREFIX}/{name}").is_dir()
    return storage.exists(f"{PREFIX}/{name}/{COMPLETE}")


# --- writing one artifact ---------------------------------------------------------------------
def _stage_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    """A JSON file into an artifact's stage folder (plain: the artifact is committed whole, see the module's docstring)."""
    path.write_text(json.dumps(data, indent=indent, default=str))
    return path


def _save_state(path: Path, state: State, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"meta": json.dumps(metadata or {}, default=str)})
    return path


def _remove(folder: Path, prefix: str) -> None:
    """Rename a local `folder` out of place, then delete it: a crash midway leaves a `<prefix><name>` leftover,
    never a half-deleted artifact under its own name."""
    gone = folder.with_name(prefix + folder.name)
    if gone.exists():  # a leftover of the same name: finish it first
        shutil.rmtree(gone)
    os.rename(folder, gone)
    shutil.rmtree(gone)


def _remove_objects(storage: Storage, files: list[str]) -> None:
    """Remove the objects of one artifact on an object store: its marker first (nothing reads it any more),
    `ids.json` last (whatever a crash leaves is still named by its ids)."""
    def order(rel: str) -> int:
        name = rel.rsplit("/", 1)[-1]
        return 0 if name == COMPLETE else 2 if name == IDS else 1

    for rel in sorted(files, key=order):
        storage.remove(rel)


class Writer:
    """The files of one artifact being written: into a local stage folder, found at `location` once committed."""

    def __init__(self, storage: Storage, name: str, stage: Path):
        self.storage = storage
        self.name = name  # the value of `ARTIFACT_TAG` on the MLflow runs logged for this artifact
        self.stage = stage

    def location(self, file: str) -> str:
        return location(self.storage, self.name, file)

    @property
    def report_json(self) -> str:
        return self.location(REPORT_JSON)

    def save_model(self, state: State, metadata: dict[str, Any] | None = None) -> str:
        _save_state(self.stage / MODEL, state, metadata)
        return self.location(MODEL)

    def save_report(self, result: dict[str, Any], figure: "Figure | None" = None) -> dict[str, Any]:
        """report.png (when a figure is given) and report.json; returns `result` with `json` and `png` set to
        where they will be found."""
        png = None
        if figure is not None:
            figure.savefig(self.stage / REPORT_PNG)
            png = self.location(REPORT_PNG)
        result = {**result, "json": self.report_json, "png": png}
        _stage_json(self.stage / REPORT_JSON, result)
        return result


@contextmanager
def writer(storage: Storage, name: str, ids: Iterable[str]) -> Iterator[Writer]:
    """Write an artifact whole (see the module's docstring): its ids first, its files into a stage, then
    committed (a previous version is removed first). An exception removes the stage: nothing half-written
    is left."""
    if not storage.local:
        stage = scratch_dir(storage, "memorization")
        try:
            _stage_json(stage / IDS, sorted(set(ids)), indent=None)
            yield Writer(storage, name, stage)
            rel = f"{PREFIX}/{name}"
            _remove_objects(storage, storage.files(rel))
            storage.write_bytes(f"{rel}/{IDS}", (stage / IDS).read_bytes())
            for path in sorted(stage.iterdir()):
                if path.name != IDS:
                    storage.write_bytes(f"{rel}/{path.name}", path.read_bytes())
            storage.write_bytes(f"{rel}/{COMPLETE}", b"")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return
    folder = storage.local_path(f"{PREFIX}/{name}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.with_name(f"{WRITING}{folder.name}-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        _stage_json(stage / IDS, sorted(set(ids)), indent=None)
        yield Writer(storage, name, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if folder.exists():
        _remove(folder, REPLACED)
    os.rename(stage, folder)


# --- reading one artifact ---------------------------------------------------------------------
def _has(storage: Storage, name: str, file: str) -> bool:
    """The file is there and belongs to a complete artifact."""
    return complete(storage, name) and storage.exists(f"{PREFIX}/{name}/{file}")


def _read_json(storage: Storage, name: str, file: str) -> Any:
    return json.loads(storage.read_bytes(f"{PREFIX}/{name}/{file}"))


def _read_parquet(storage: Storage, name: str, file: str) -> pd.DataFrame:
    with storage.open(f"{PREFIX}/{name}/{file}") as f:
        return pd.read_parquet(f)


def _load_state(storage: Storage, name: str) -> State:
    from safetensors.torch import load

    return load(storage.read_bytes(f"{PREFIX}/{name}/{MODEL}"))


# --- the artifacts ----------------------------------------------------------------------------
def save_original(storage: Storage, train_ids: list[str], mcfg: MemorizationConfig, state: State, proxies: pd.DataFrame,
                  training: dict[str, Any]) -> str:
    """model.safetensors + proxies.parquet + training.json (the training's counts); its ids are the training set.
    Returns its location."""
    name = original_name(train_ids, mcfg)
    with writer(storage, name, train_ids) as w:
        _save_state(w.stage / MODEL, state)
        proxies.to_parquet(w.stage / "proxies.parquet")
        _stage_json(w.stage / "training.json", training, indent=None)
    return location(storage, name)


def load_original(storage: Storage, train_ids: list[str], mcfg: MemorizationConfig
                  ) -> tuple[State, pd.DataFrame, dict[str, Any]] | None:
    """The cached original model of this config and training set (state, proxies, training counts), or None."""
    name = original_name(train_ids, mcfg)
    if not _has(storage, name, "training.json"):
        return None
    return _load_state(storage, name), _read_parquet(storage, name, "proxies.parquet"), _read_json(storage, name, "training.json")


def save_scores(storage: Storage, table: pd.DataFrame, meta: dict[str, Any], ids: Iterable[str]) -> str:
    """scores.parquet (one row per training id) + scores.json (`meta`); returns the parquet's location."""
    with writer(storage, SCORES, ids) as w:
        table.to_parquet(w.stage / "scores.parquet")
        _stage_json(w.stage / "scores.json", meta)
    return w.location("scores.parquet")


def load_scores(storage: Storage) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """(the table, its meta, the ids it was computed from: what anything built on it is built from too)."""
    if not _has(storage, SCORES, "scores.json"):
        raise FileNotFoundError(f"{location(storage, SCORES, 'scores.json')}: materialize memorization_scores first")
    if not _has(storage, SCORES, IDS):
        raise FileNotFoundError(f"{location(storage, SCORES, IDS)}: written before artifacts named their ids; "
                                "materialize memorization_scores again")
    return (_read_parquet(storage, SCORES, "scores.parquet"), _read_json(storage, SCORES, "scores.json"),
            _read_json(storage, SCORES, IDS))


def save_unlearned(storage: Storage, state: State, info: dict[str, Any], ids: Iterable[str],
                   metadata: dict[str, Any] | None = None) -> str:
    """model.safetensors + unlearned.json (`info`); returns the model's location."""
    with writer(storage, UNLEARNED, ids) as w:
        path = w.save_model(state, metadata)
        _stage_json(w.stage / "unlearned.json", info)
    return path


def load_unlearned(storage: Storage) -> tuple[State, dict[str, Any]]:
    if not _has(storage, UNLEARNED, "unlearned.json"):
        raise FileNotFoundError(f"{location(storage, UNLEARNED, 'unlearned.json')}: materialize rum_unlearned first")
    return _load_state(storage, UNLEARNED), _read_json(storage, UNLEARNED, "unlearned.json")


# --- erasure ----------------------------------------------------------------------------------
@dataclass
class Erased:
    """What one `erase` call removed; empty when nothing was built from a deleted example."""

    paths: list[str] = field(default_factory=list)  # the artifacts removed (local folders or URLs)
    mlflow_tags: list[str] = field(default_factory=list)  # artifact names: runs tagged ARTIFACT_TAG=<name> are to be deleted


def _built_from_deleted(ids_json: Callable[[], bytes], is_deleted: Callable[[str], bool]) -> bool:
    try:
        ids = json.loads(ids_json())
    except (FileNotFoundError, ValueError):
        return True  # written before artifacts named their ids, or cut short before: its ids are unknown
    return any(is_deleted(str(i)) for i in ids)


def _tag(parent: Path, name: str) -> str:
    """The artifact a local folder in `parent` is, or was meant to be (`.erasing-X` and `.writing-X-<hex>` are
    X): its name, the MLflow tag value of its runs."""
    name = name.removeprefix(ERASING)
    name = name[len(WRITING):].rsplit("-", 1)[0] if name.startswith(WRITING) else name
    return f"{RUNS}/{name}" if parent.name == RUNS else name


def erase(storage: Storage, is_deleted: Callable[[str], bool]) -> Erased:
    """Physically remove every artifact built from an example for which `is_deleted(id)` is true.

    The artifacts hold models trained on those examples and lists of their ids. Locally each folder is
    renamed to `.erasing-<name>` before it is deleted; leftovers of an interrupted call (`.erasing-*`, and
    `.replaced-*` of an interrupted rewrite) are finished first, so calling again after a crash
    completes the work and a second call is a no-op. Stages (`.writing-*`) are judged by their ids like
    any artifact. On an object store an artifact is removed marker first (`_remove_objects`), and an
    incomplete one (a write or removal cut short) is removed whatever its ids, which also finishes an
    interrupted call. Returns the artifacts removed and the artifact names whose MLflow runs the caller
    must delete; a finished `.erasing-<name>` (or an incomplete artifact) names <name> again, since the
    call that started removing it may not have returned. Not meant to run beside a writer of the same
    state (a stage or an incomplete artifact it has not yet named its ids in would be removed, failing
    or truncating that write).
    """
    if not storage.local:
        return _erase_objects(storage, is_deleted)
    out = Erased()
    base = storage.local_path(PREFIX)
    for parent in (base, base / RUNS):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if not path.is_dir() or path == base / RUNS:
                continue
            if path.name.startswith((ERASING, REPLACED)):
                shutil.rmtree(path)  # finish what an interrupted call started
            elif _built_from_deleted((path / IDS).read_bytes, is_deleted):
                _remove(path, ERASING)
            else:
                continue
            out.paths.append(str(path))
            if not path.name.startswith(REPLACED):  # a replaced version's runs are named by its successor
                out.mlflow_tags.append(_tag(parent, path.name))
    out.mlflow_tags = list(dict.fromkeys(out.mlflow_tags))
    return out


def _erase_objects(storage: Storage, is_deleted: Callable[[str], bool]) -> Erased:
    artifacts: dict[str, list[str]] = {}
    for rel in storage.files(PREFIX):
        parts = rel.split("/")
        name = "/".join(parts[1:3] if parts[1] == RUNS else parts[1:2])
        if name != RUNS:
            artifacts.setdefault(name, []).append(rel)
    out = Erased()
    for name, files in sorted(artifacts.items()):
        whole = f"{PREFIX}/{name}/{COMPLETE}" in files
        if whole and not _built_from_deleted(lambda name=name: storage.read_bytes(f"{PREFIX}/{name}/{IDS}"), is_deleted):
            continue
        _remove_objects(storage, files)
        out.paths.append(location(storage, name))
        out.mlflow_tags.append(name)
    return out


class ArtifactEraser:
    """What erasure (s3t_ops/erasure.py) sees of the memorization artifacts: the engine gives it to every state."""

    run_tag = ARTIFACT_TAG  # runs describing an artifact carry its name under this tag

    def erase(self, storage: Storage, is_deleted: Callable[[str], bool]) -> list[str]:
        return erase(storage, is_deleted).paths

    def alive(self, storage: Storage, name: str) -> bool:
        return complete(storage, name)


ERASER = ArtifactEraser()

"""Every file the memorization group keeps in a state folder, and their erasure.

Layout under `<state>/memorization/`, one folder per artifact:

  original-<key>/          the original model of one config and live training set (key: a hash of both)
                           model.safetensors, proxies.parquet, training.json
  scores/                  the `memorization_scores` asset: scores.parquet, scores.json
  unlearned/               the `rum_unlearned` asset: model.safetensors, unlearned.json
  report/                  the `unlearning_report` asset: report.json, report.png
  runs/<stamp>-<method>/   one `s3t unlearn` call: report.json, report.png (with an oracle), model.safetensors
  .writing-<name>-<hex>/   an artifact being written; renamed to <name> once complete
  .replaced-<name>/        the previous version of a rewritten artifact, being removed
  .erasing-<name>/         an artifact being erased

Every artifact folder also holds `ids.json`: the sorted ids of every example its files were computed
from (the training set, plus the validation split where the holdout-retraining proxy fine-tuned on it
and the test split where accuracies and the MIA were measured on it). It is written first, so any
folder holding data names its ids; `erase` reads nothing else. An artifact is written whole into a
`.writing-*` sibling and renamed into place: readers never see half of one, and a crash leaves
either the old version or the new one.

MLflow runs logged for an artifact carry the tag `ARTIFACT_TAG` = its folder relative to
`<state>/memorization/` (`runs/<stamp>-<method>`, `report`): runs whose folder is gone are to be
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
from s3t_ops.memorization.model import State, TrainResult
from s3t_ops.memorization.workflow import OriginalModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ARTIFACT_TAG = "s3t.memorization_artifact"
SCORES, UNLEARNED, REPORT, RUNS = "scores", "unlearned", "report", "runs"
IDS = "ids.json"
WRITING, REPLACED, ERASING = ".writing-", ".replaced-", ".erasing-"
MODEL, REPORT_JSON, REPORT_PNG = "model.safetensors", "report.json", "report.png"


def root(state_dir: str | Path) -> Path:
    return Path(state_dir) / "memorization"


def original_folder(state_dir: str | Path, train_ids: list[str], mcfg: MemorizationConfig) -> Path:
    """Where the original model of this config and live training set (in this order) is cached."""
    key = hashlib.sha256(json.dumps({k: v for k, v in mcfg.to_dict().items() if k in ("depth", "epochs", "lr", "batch_size", "seed")},
                                    sort_keys=True).encode() + "|".join(train_ids).encode()).hexdigest()[:12]
    return root(state_dir) / f"original-{key}"


def run_folder(state_dir: str | Path, group: str, method: str) -> Path:
    return root(state_dir) / RUNS / f"{group}-{method}"


# --- writing one artifact ---------------------------------------------------------------------
def _write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    path.write_text(json.dumps(data, indent=indent, default=str))
    return path


def _save_state(path: Path, state: State, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"meta": json.dumps(metadata or {}, default=str)})
    return path


def _load_state(path: Path) -> State:
    from safetensors.torch import load_file

    return load_file(str(path))


def _remove(folder: Path, prefix: str) -> None:
    """Rename `folder` out of place, then delete it: a crash midway leaves a `<prefix><name>` leftover, never
    a half-deleted artifact under its own name."""
    gone = folder.with_name(prefix + folder.name)
    if gone.exists():  # a leftover of the same name: finish it first
        shutil.rmtree(gone)
    os.rename(folder, gone)
    shutil.rmtree(gone)


class Writer:
    """The files of one artifact being written: into a stage folder, found under `folder` once committed."""

    def __init__(self, folder: Path, stage: Path):
        self.folder = folder
        self.stage = stage

    @property
    def name(self) -> str:
        """The value of `ARTIFACT_TAG` on the MLflow runs logged for this artifact."""
        return _tag(self.folder.parent, self.folder.name)

    @property
    def report_json(self) -> Path:
        return self.folder / REPORT_JSON

    def save_model(self, state: State, metadata: dict[str, Any] | None = None) -> Path:
        _save_state(self.stage / MODEL, state, metadata)
        return self.folder / MODEL

    def save_report(self, result: dict[str, Any], figure: "Figure | None" = None) -> dict[str, Any]:
        """report.png (when a figure is given) and report.json; returns `result` with `json` and `png` set to
        where they will be found."""
        png = None
        if figure is not None:
            figure.savefig(self.stage / REPORT_PNG)
            png = str(self.folder / REPORT_PNG)
        result = {**result, "json": str(self.report_json), "png": png}
        _write_json(self.stage / REPORT_JSON, result)
        return result


@contextmanager
def writer(folder: Path, ids: Iterable[str]) -> Iterator[Writer]:
    """Write an artifact whole: its ids first, its files into a `.writing-*` sibling, then renamed into place
    (a previous version is removed first). An exception removes the stage: nothing half-written is left."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.with_name(f"{WRITING}{folder.name}-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        _write_json(stage / IDS, sorted(set(ids)), indent=None)
        yield Writer(folder, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if folder.exists():
        _remove(folder, REPLACED)
    os.rename(stage, folder)


# --- the artifacts ----------------------------------------------------------------------------
def save_original(state_dir: str | Path, train_ids: list[str], mcfg: MemorizationConfig, original: OriginalModel) -> Path:
    """model.safetensors + proxies.parquet + training.json; its ids are the training set."""
    folder = original_folder(state_dir, train_ids, mcfg)
    t = original.training
    info = {"epoch_losses": t.epoch_losses, "steps": t.steps, "grad_example_steps": t.grad_example_steps, "seconds": t.seconds,
            "seen_ids": sorted(t.seen_ids)}
    with writer(folder, train_ids) as w:
        _save_state(w.stage / MODEL, original.state)
        original.proxies.to_parquet(w.stage / "proxies.parquet")
        _write_json(w.stage / "training.json", info, indent=None)
    return folder


def load_original(state_dir: str | Path, train_ids: list[str], mcfg: MemorizationConfig) -> OriginalModel | None:
    """The cached original model of this config and training set, or None."""
    folder = original_folder(state_dir, train_ids, mcfg)
    if not (folder / "training.json").is_file():
        return None
    info = json.loads((folder / "training.json").read_text())
    training = TrainResult(state={}, seen_ids=set(info.pop("seen_ids")), **info)
    training.state = _load_state(folder / MODEL)
    return OriginalModel(training.state, pd.read_parquet(folder / "proxies.parquet"), training)


def save_scores(state_dir: str | Path, table: pd.DataFrame, meta: dict[str, Any], ids: Iterable[str]) -> Path:
    """scores.parquet (one row per training id) + scores.json (`meta`); returns the parquet's path."""
    folder = root(state_dir) / SCORES
    with writer(folder, ids) as w:
        table.to_parquet(w.stage / "scores.parquet")
        _write_json(w.stage / "scores.json", meta)
    return folder / "scores.parquet"


def load_scores(state_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """(the table, its meta, the ids it was computed from: what anything built on it is built from too)."""
    folder = root(state_dir) / SCORES
    if not (folder / "scores.json").is_file():
        raise FileNotFoundError(f"{folder}/scores.json: materialize memorization_scores first")
    if not (folder / IDS).is_file():
        raise FileNotFoundError(f"{folder}/{IDS}: written before artifacts named their ids; materialize memorization_scores again")
    return (pd.read_parquet(folder / "scores.parquet"), json.loads((folder / "scores.json").read_text()),
            json.loads((folder / IDS).read_text()))


def save_unlearned(state_dir: str | Path, state: State, info: dict[str, Any], ids: Iterable[str],
                   metadata: dict[str, Any] | None = None) -> Path:
    """model.safetensors + unlearned.json (`info`); returns the model's path."""
    with writer(root(state_dir) / UNLEARNED, ids) as w:
        path = w.save_model(state, metadata)
        _write_json(w.stage / "unlearned.json", info)
    return path


def load_unlearned(state_dir: str | Path) -> tuple[State, dict[str, Any]]:
    folder = root(state_dir) / UNLEARNED
    if not (folder / "unlearned.json").is_file():
        raise FileNotFoundError(f"{folder}/unlearned.json: materialize rum_unlearned first")
    return _load_state(folder / MODEL), json.loads((folder / "unlearned.json").read_text())


# --- erasure ----------------------------------------------------------------------------------
@dataclass
class Erased:
    """What one `erase` call removed; empty when nothing was built from a deleted example."""

    paths: list[Path] = field(default_factory=list)  # the folders removed
    mlflow_tags: list[str] = field(default_factory=list)  # artifact names: runs tagged ARTIFACT_TAG=<name> are to be deleted


def _built_from_deleted(folder: Path, is_deleted: Callable[[str], bool]) -> bool:
    try:
        ids = json.loads((folder / IDS).read_text())
    except (FileNotFoundError, ValueError):
        return True  # written before artifacts named their ids, or cut short before: its ids are unknown
    return any(is_deleted(str(i)) for i in ids)


def _tag(parent: Path, name: str) -> str:
    """The artifact a folder in `parent` is, or was meant to be (`.erasing-X` and `.writing-X-<hex>` are X),
    as its path relative to the memorization folder: the MLflow tag value of its runs."""
    name = name.removeprefix(ERASING)
    name = name[len(WRITING):].rsplit("-", 1)[0] if name.startswith(WRITING) else name
    return f"{RUNS}/{name}" if parent.name == RUNS else name


def erase(state_dir: str | Path, is_deleted: Callable[[str], bool]) -> Erased:
    """Physically remove every artifact built from an example for which `is_deleted(id)` is true.

    The artifacts hold models trained on those examples and lists of their ids. Each folder is renamed
    to `.erasing-<name>` before it is deleted; leftovers of an interrupted call (`.erasing-*`, and
    `.replaced-*` of an interrupted rewrite) are finished first, so calling again after a crash
    completes the work and a second call is a no-op. Stages (`.writing-*`) are judged by their ids like
    any artifact. Returns the folders removed and the artifact names whose MLflow runs the caller must
    delete; a finished `.erasing-<name>` names <name> again, since the call that renamed it may not have
    returned. Not meant to run beside a writer of the same state (a stage it has not yet named its
    ids in would be removed, failing that write).
    """
    out = Erased()
    base = root(state_dir)
    for parent in (base, base / RUNS):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if not path.is_dir() or path == base / RUNS:
                continue
            if path.name.startswith((ERASING, REPLACED)):
                shutil.rmtree(path)  # finish what an interrupted call started
            elif _built_from_deleted(path, is_deleted):
                _remove(path, ERASING)
            else:
                continue
            out.paths.append(path)
            if not path.name.startswith(REPLACED):  # a replaced version's runs are named by its successor
                out.mlflow_tags.append(_tag(parent, path.name))
    out.mlflow_tags = list(dict.fromkeys(out.mlflow_tags))
    return out

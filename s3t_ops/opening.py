"""Creating a state folder (ingest) and opening one (checks, migration, re-rooting), before any room touches it.

A new folder appears only when ingest succeeded: it is built under a hidden sibling name and renamed into place, so
a failure leaves nothing behind. The folder may already hold what our own servers create in it before a state
exists (an `mlflow ui` started on `<state>/mlflow.db` first, as the README's order does): the state is then built
beside it and moved in, config.json last (a state is a folder with a config.json). Creating a state also creates
its MLflow store with its schema migrated (once, here: never by parallel first users later) and checks that the
registered model name is free or its own.

Opening checks the ledger before anything writes to it, migrates an older schema in place, and re-roots the
state's own MLflow store when the folder was moved or copied (mlflow_db.py). Repair, which every command runs
next, is repair.py's.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd

from s3t_ops.checkpoints import root_key, stage_key
from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.faults import crash_point
from s3t_ops.files import alive, write_json
from s3t_ops.ledger import MIGRATABLE
from s3t_ops.partition import assign
from s3t_ops.publish import ForeignModel, Publisher, settings_from_env
from s3t_ops.registry import prepare_registry
from s3t_ops.state import CONFIG_FILE, State, StateError
from s3t_ops.storage import Storage
from s3t_ops.token import create_token
from s3t_ops.tombstones import Keyring

CREATING = ".creating-"
SERVER_FILES = ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlartifacts")  # what `mlflow ui` makes
MOVING = ".s3t-moving-in-"


def create_state(cfg: S3TConfig, source: str | Path | None = None, publisher: Publisher | None = None,
                 secret: bytes | None = None, **state_args) -> Path:
    """Ingest into a NEW state folder (see the module's docstring); returns the folder, ready to open. `secret`: the
    tombstone key, for a state that must share another's keyspace (tests comparing two states' keys)."""
    from s3t_ops.model_dir import backbone_shape

    root = Path(cfg.state_dir)
    if root.is_file():
        raise StateError(f"--state {root} is a file, not a folder")
    cfg = cfg.resolved()  # `auto` device made concrete: the state saves where its stages train
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
        _ingest(State(cfg.replace(state_dir=tmp), publisher=publisher, **state_args), source, root.resolve(), secret)
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
    return root


def _ingest(state: State, source: str | Path | None, final_root: Path, secret: bytes | None) -> dict[str, int]:
    """Read the source, assign (shard, slice), write the ledger, the tombstone key, the registry's store and
    config.json (into the state's folder, which becomes `final_root`)."""
    from s3t_ops.data import build_dataset, load_source

    cfg = state.cfg
    ds = build_dataset(load_source(source), cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    frame = ds.frame.copy()
    n_train = int((frame["split"] == "train").sum())
    cfg.check_examples(n_train)
    cells = [assign(i, cfg.shards, cfg.slices, cfg.seed) if s == "train" else (None, None) for i, s in zip(frame["id"], frame["split"])]
    frame["shard"] = pd.array([c[0] for c in cells], dtype="Int64")
    frame["slice"] = pd.array([c[1] for c in cells], dtype="Int64")
    empty = {(s, j) for s in range(cfg.shards) for j in range(cfg.slices)} - {
        (int(a), int(b)) for a, b in zip(frame["shard"].dropna(), frame["slice"].dropna())}
    if empty:
        raise ConfigError("shards", f"{len(empty)} slice(s) would be empty with {n_train} training examples; use fewer shards or slices")
    state.ledger.create(Keyring.create(state.root, secret))
    state.ledger.add_examples(frame)
    state_id = uuid.uuid4().hex
    registry = state._publisher.describe() if state._publisher is not None else settings_from_env()
    for key, value in (("label_names", list(ds.label_names)), ("source", str(source or "tweets")), ("state_id", state_id),
                       ("root", str(final_root)), ("registry", registry)):
        state.ledger.set_meta(key, value)
    if state._publisher is not None:
        state._publisher.bind(state_id)
    try:
        prepare_registry(registry, state.root, final_root, state_id)
    except ForeignModel as exc:
        raise StateError(str(exc)) from None
    create_token(state.root)  # for the server's /forget (s3t serve), owner-readable
    write_json(state.root / CONFIG_FILE, cfg.to_dict())
    return {k: int(v) for k, v in frame["split"].value_counts().items()}


def open_state(state_dir: str | Path, **state_args) -> State:
    """An existing state: config read, ledger checked (a damaged one is reported before anything writes to it),
    migrated from an older schema, re-rooted if the folder moved."""
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
    state = State(S3TConfig.from_dict({**data, "state_dir": str(root)}), **state_args)
    state.ledger.check()
    _migrate(state)
    _reroot(state)
    state.publisher  # resolve the registry now: a misconfiguration fails before any write
    return state


def _migrate(state: State) -> None:
    """Bring an older ledger up to date (ledger.py MIGRATABLE), then finish renaming checkpoint files to the keys it
    re-derived (a crash between the two is finished here on the next open)."""
    if state.ledger.schema_version in MIGRATABLE:
        n_labels = len(state.label_names)
        with state.ledger.locked():
            state.ledger.migrate_v2(lambda s: root_key(state.cfg.training_fingerprint(), state.backbone_fingerprint(), s, n_labels),
                                    stage_key, state.data_files.hashes_on_disk)
    if state.ledger.get_meta("state_id") is None:
        state.ledger.set_meta("state_id", uuid.uuid4().hex)
    pending = state.ledger.get_meta("pending_renames")
    if pending:
        with state.ledger.locked():
            for old, new in pending.items():
                state.checkpoints.rename(old, new)
            state.ledger.set_meta("pending_renames", None)


def _reroot(state: State) -> None:
    """A state moved or copied to another folder: the paths its own MLflow store recorded are rewritten to the folder
    it is in now (mlflow_db.py), so it erases and publishes only inside itself. A copy that publishes to a shared store,
    beside an original that still exists, gets an id of its own: publishing under the original's model name is then
    refused instead of mixing two states' versions. Nothing is written when nothing moved."""
    from s3t_ops import mlflow_db

    here = str(state.root.resolve())
    settings = state.ledger.get_meta("registry") or {}
    if settings.get("kind") != "mlflow":
        return
    if not settings.get("tracking_uri"):
        db = state.root / "mlflow.db"
        before = mlflow_db.recorded_root(db, settings.get("experiment") or "s3t")
        if before not in (None, here):
            with state.ledger.locked():
                mlflow_db.reroot(db, before, here)
        return
    recorded = state.ledger.get_meta("root")
    if recorded not in (None, here):
        with state.ledger.locked():
            if (Path(recorded) / CONFIG_FILE).is_file():  # the original is still there: this is a copy
                state.ledger.set_meta("state_id", uuid.uuid4().hex)
            state.ledger.set_meta("root", here)


def _server_files(root: Path) -> list[str]:
    """The entries of an existing state folder to be, all made by our own servers (else StateError). Leftovers of a
    creation that died while moving in (its marker names a dead process) are removed first."""
    if not root.is_dir():
        return []
    for marker in root.glob(f"{MOVING}*"):
        pid = marker.name.removeprefix(MOVING)
        if pid.isdigit() and not alive(int(pid)) and not (root / CONFIG_FILE).exists():
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


def _remove_abandoned_creations(parent: Path, name: str) -> None:
    """Hidden folders of creations whose process died (a crash during ingest)."""
    for p in parent.glob(f".{name}{CREATING}*"):
        pid = p.name.rsplit(CREATING, 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)

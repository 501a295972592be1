"""A newcomer's first run, below the browser: the state owns its MLflow store from its creation (a server started
first, parallel first users and the README's order never race or fail), the forget job refuses bad input with one
clear message, and the shipped small config is a valid config."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from s3t_ops.engine import S3T
from tests.statecheck import ROOT, cli_env, tiny_world

pytestmark = pytest.mark.timeout(600)


def _tables(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def test_a_new_state_owns_a_migrated_mlflow_store_before_anything_publishes(tmp_path, tiny_backbone_dir):
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 40)
    engine = S3T.create(cfg, data, progress=False)  # the default registry: MLflow in the state folder
    db = cfg.state_dir / "mlflow.db"
    assert db.is_file() and {"alembic_version", "experiments", "runs", "registered_models"} <= _tables(db)
    con = sqlite3.connect(db)
    try:
        (location,) = con.execute("SELECT artifact_location FROM experiments WHERE name = 's3t'").fetchone()
    finally:
        con.close()
    assert location == (cfg.state_dir.resolve() / "mlartifacts").as_uri()  # the final folder, not the build folder
    assert engine.served() is None  # nothing trained or published yet: the store came with the state


WORKER = """
import sys
from s3t_ops.engine import S3T
engine = S3T.open(sys.argv[1], progress=False)
row = dict(key=f"probe-{sys.argv[2]}", shard=0, stage=1, prefix="0", slice=0, slice_version="v", n_train=1, seconds=0.1)
engine.publisher.tracker.log_stage(row, engine.cfg.to_dict())
print("ok")
"""


def test_parallel_first_users_of_the_store_do_not_race(tmp_path, tiny_backbone_dir):
    """Three processes opening the state's store at once (the first backfill's parallel stage runs)."""
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 40)
    S3T.create(cfg, data, progress=False)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg.state_dir), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]


def test_a_state_folder_made_by_mlflow_ui_first_is_accepted(tmp_path, tiny_backbone_dir):
    """The README's order: `mlflow ui --backend-store-uri sqlite:///$S3T_STATE/mlflow.db` starts before the state
    exists and creates the folder and its store; the first training then builds the state in that folder."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 40)
    cfg.state_dir.mkdir()
    SqlAlchemyStore(f"sqlite:///{cfg.state_dir / 'mlflow.db'}", str(tmp_path / "mlartifacts"))  # what mlflow ui does
    (cfg.state_dir / "mlartifacts").mkdir()
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    assert engine.publisher.tracker.champion() is not None
    assert sorted(p.name for p in cfg.state_dir.iterdir() if p.name.startswith(".")) == []  # no marker or build folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    from s3t_ops.engine import StateError

    with pytest.raises(StateError, match="already holds files"):  # anything else in the folder is still refused
        S3T.create(cfg.replace(state_dir=tmp_path / "other"), data, progress=False)


def test_a_creation_that_died_while_moving_in_is_undone_by_the_next(tmp_path, tiny_backbone_dir):
    from s3t_ops.opening import MOVING

    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 40)
    cfg.state_dir.mkdir()
    (cfg.state_dir / "mlflow.db").write_bytes(b"")  # a server's store (empty file: created, not yet migrated)
    (cfg.state_dir / "ledger.duckdb").write_bytes(b"half")  # moved in by a creation that then died
    (cfg.state_dir / f"{MOVING}999999").write_text("ledger.duckdb")
    from s3t_ops.publish import Publisher

    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    assert engine.examples("train").shape[0] > 0 and not list(cfg.state_dir.glob(f"{MOVING}*"))


# ---------------------------------------------------------------- the forget job's refusals

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_backbone_dir):
    from pipelines.definitions import build_definitions
    from pipelines.settings import PipelineSettings
    from s3t_ops.publish import Publisher

    root = tmp_path_factory.mktemp("first")
    cfg, data = tiny_world(root, tiny_backbone_dir, 40)
    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    engine.fit()
    return build_definitions(PipelineSettings(cfg=cfg)), engine


@pytest.mark.parametrize("ids,message", [([], "nothing to forget: `ids` is empty"), (["  "], "holds a blank id"),
                                         (["no-such-id"], "1 unknown example id(s): no-such-id; nothing was deleted")])
def test_the_forget_job_refuses_bad_ids_with_one_clear_message(pipeline, ids, message):
    defs, engine = pipeline
    before = engine.ledger.deletions()
    result = defs.resolve_job_def("forget").execute_in_process(
        run_config={"ops": {"forget_examples": {"config": {"ids": ids}}}}, instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert message in description and "\n" not in description
    assert engine.ledger.deletions().equals(before)


def test_the_shipped_small_config_is_valid_and_small():
    from s3t_ops.config import S3TConfig

    data = json.loads((ROOT / "pipelines" / "examples" / "small.json").read_text())
    cfg = S3TConfig.from_dict({**data, "state_dir": "unused"})
    assert cfg.n_train <= 300 and cfg.epochs == 1 and cfg.shards * cfg.slices * cfg.budget <= 8

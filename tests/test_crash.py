"""Crash trials: SIGKILL `s3t` at every named crash point, then check that the next command repairs.

Each trial copies a trained state (tiny backbone, MLflow registry in the state folder), runs one CLI
command in a subprocess with S3T_CRASH_AT=<point> (it must die by SIGKILL at that point), opens the
state as every command does (open = repair), and asserts the promise:
- 0 accepted deletions are lost (a request whose transaction committed is deleted and honoured; one
  killed before the commit is absent, and sending it again honours it);
- 0 served plans or registry versions hold a deleted id, and the champion honours the deletion;
- a byte scan of the whole state folder (ledger, trunk, slices, checkpoints, MLflow store and artifacts)
  finds the deleted text, and the raw id, 0 times; no orphan or temporary file remains;
- after retraining, every checkpoint is byte-identical (hence torch.equal) to a clean run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from s3t_ops.engine import S3T
from s3t_ops.faults import POINTS
from tests.statecheck import byte_scan, copy_state, run_cli, tiny_world

pytestmark = pytest.mark.timeout(600)

FORGET_POINTS = ["before_deletion_commit", "before_plan_pointer", "after_deletion_commit", "after_model_logged", "after_version_registered",
                 "after_alias_moved", "during_purge", "during_trunk_erase", "during_slice_erase", "during_registry_erase",
                 "during_compaction", "before_erased_mark"]
TRAIN_POINTS = ["before_checkpoint_record", "after_checkpoint_file", "before_checkpoint_commit", "after_checkpoint_commit",
                "after_checkpoint_file:3", "before_retrained_mark", "after_model_logged", "after_alias_moved"]


@dataclass
class World:
    root: Path
    cfg_args: list[str]
    data: Path
    template: Path  # trained and registered, slices materialized
    forgotten: Path  # template after `forget x` (stages await retraining)
    x: str
    text: str
    reference: dict[str, bytes]  # clean run: forget x, retrain -> checkpoint bytes by key
    reference_plan: dict


def _cfg_args(backbone: Path) -> list[str]:
    return ["--shards", "2", "--slices", "2", "--budget", "2", "--epochs", "1", "--batch-size", "8", "--max-tokens", "16",
            "--lora-rank", "4", "--n-train", "0", "--n-val", "8", "--n-test", "8", "--backbone", str(backbone)]


def _checkpoint_bytes(engine: S3T) -> dict[str, bytes]:
    return {s.key: engine.checkpoints.path(s.key).read_bytes() for s in engine.stage_specs()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone_dir) -> World:
    root = tmp_path_factory.mktemp("crash")
    cfg, data = tiny_world(root, tiny_backbone_dir, 72, state="template")
    engine = S3T.create(cfg, data, progress=False)  # the default publisher: MLflow in the state folder
    engine.fit()
    for s in range(2):
        for j in range(2):
            engine.materialize_slice(s, j)  # what the pipeline's slice_data writes (erasure must reach it)
    train = engine.examples("train")
    row = train[(train["shard"] == 0) & (train["slice"] == 0)].iloc[0]
    x, text = row["id"], row["text"]
    ref = S3T.open(copy_state(root / "template", root / "reference"), progress=False)
    ref.forget([x])
    ref.retrain()
    forgotten = S3T.open(copy_state(root / "template", root / "forgotten"), progress=False)
    forgotten.forget([x])
    assert forgotten.missing_stages()  # training points have work to crash in
    return World(root, _cfg_args(tiny_backbone_dir), data, root / "template", root / "forgotten", x, text,
                 _checkpoint_bytes(ref), ref.served()[1])


def _assert_exact_and_erased(engine: S3T, w: World) -> None:
    ledger = engine.ledger
    assert ledger.is_deleted(w.x) and w.x not in set(engine.examples()["id"])
    d = ledger.deletions()
    assert d["honoured_at"].notna().all() and d["erased_at"].notna().all()
    assert engine.audit() == {}
    tracker = engine.publisher.tracker
    champ = tracker.champion()
    latest = engine.served()
    assert champ is not None and champ["plan_id"] == str(latest[0])
    assert ledger.tombstone(w.x) in champ["tags"]["honoured_deletions"].split(",")
    for v in tracker.versions():  # no registry version serves a deleted example
        record = ledger.plan(int(v["tags"]["plan_id"]))
        assert record is not None and engine.audit(record) == {}, v
    assert byte_scan(engine.root, [w.text, w.x]) == []
    live = set(engine.checkpoint_rows())
    assert engine.checkpoints.keys_on_disk() == live  # no orphan file, no row without a file
    assert not [p for p in engine.root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".compact")]


def _assert_equals_clean_run(engine: S3T, w: World) -> None:
    assert engine.missing_stages() == []
    assert _checkpoint_bytes(engine) == w.reference  # byte-identical files: equal tensors, bit for bit
    assert engine.served()[1] == w.reference_plan
    assert engine.ledger.deletions()["retrained_at"].notna().all()


def _crash(args: list[str], point: str) -> None:
    r = run_cli(args, S3T_CRASH_AT=point)
    assert r.returncode == -9, f"crash point {point} was not reached (rc={r.returncode}): {r.stderr[-2000:]}"


@pytest.mark.parametrize("point", FORGET_POINTS)
def test_crash_while_forgetting(world, point, tmp_path):
    state = copy_state(world.template, tmp_path / "state")
    _crash(["forget", world.x, "--state", str(state)], point)
    engine = S3T.open(state, progress=False)  # what every command does first: repair
    if point == "before_deletion_commit":  # the request never committed: absent, and the command never said otherwise
        assert not engine.ledger.is_deleted(world.x) and world.x in set(engine.examples()["id"])
        assert engine.audit() == {}
        engine.forget([world.x])  # the user sends it again
    _assert_exact_and_erased(engine, world)
    assert engine.ledger.read_pointer() == engine.served()  # servers read the plan the ledger serves
    engine.retrain()
    _assert_equals_clean_run(engine, world)


@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_crash_while_retraining(world, point, tmp_path):
    state = copy_state(world.forgotten, tmp_path / "state")
    _crash(["train", "--state", str(state), "--quiet"], point)
    engine = S3T.open(state, progress=False)
    _assert_exact_and_erased(engine, world)
    engine.retrain()
    _assert_exact_and_erased(engine, world)
    _assert_equals_clean_run(engine, world)


def test_crash_during_ingest_leaves_no_state_and_the_next_train_succeeds(world, tmp_path):
    state = tmp_path / "new"
    args = ["train", "--state", str(state), "--source", str(world.data), "--quiet", *world.cfg_args]
    _crash(args, "during_ingest")
    assert not state.exists()
    leftovers = list(tmp_path.glob(".new.creating-*"))
    assert leftovers  # the half-built folder is hidden, never the state
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert (state / "config.json").is_file() and not list(tmp_path.glob(".new.creating-*"))


def test_the_repair_command_reports_what_it_finished(world, tmp_path):
    state = copy_state(world.template, tmp_path / "state")
    _crash(["forget", world.x, "--state", str(state)], "after_deletion_commit")
    r = run_cli(["repair", "--state", str(state)])
    assert r.returncode == 0, r.stderr
    assert "published plan" in r.stdout and "erased 1 deleted example(s)" in r.stdout
    r = run_cli(["repair", "--state", str(state)])
    assert r.returncode == 0 and "nothing to repair" in r.stdout


def test_every_crash_point_is_tried():
    tried = {p.split(":")[0] for p in FORGET_POINTS + TRAIN_POINTS} | {"during_ingest"}
    assert tried == set(POINTS)
    assert len(FORGET_POINTS) + len(TRAIN_POINTS) + 2 >= 20


def test_the_lifecycle_doc_lists_every_crash_point():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "lifecycle.md").read_text()
    assert all(f"`{p}`" in doc for p in POINTS)

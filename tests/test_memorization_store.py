"""The memorization store: every artifact names the ids it was built from, and `erase` removes exactly those
built from a deleted example, crash-safely and idempotently."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from s3t_ops.memorization import artifacts as store
from s3t_ops.storage import Storage
from tests.conftest import toy_frame


def _root(state: Path) -> Path:
    return state / store.PREFIX


def _artifacts(state: Path) -> set[str]:
    """Artifact folders by their MLflow tag value: `original-*`, `scores`, ..., `runs/<name>`."""
    base = _root(state)
    runs = {f"runs/{p.name}" for p in (base / "runs").iterdir()} if (base / "runs").is_dir() else set()
    return {p.name for p in base.iterdir() if p.is_dir() and p.name != "runs"} | runs


def test_writer_commits_whole_versions_and_leaves_nothing_on_failure(tmp_path):
    storage = Storage(tmp_path)
    folder = _root(tmp_path) / store.REPORT
    with store.writer(storage, store.REPORT, ["b", "a", "a"]) as w:
        (w.stage / "old.txt").write_text("v1")
        assert not folder.exists()  # readers see nothing until the version is complete
    assert json.loads((folder / store.IDS).read_text()) == ["a", "b"]
    with store.writer(storage, store.REPORT, ["c"]) as w:
        (w.stage / "new.txt").write_text("v2")
    assert sorted(p.name for p in folder.iterdir()) == [store.IDS, "new.txt"]  # the old version is gone whole
    with pytest.raises(RuntimeError):
        with store.writer(storage, store.REPORT, ["d"]) as w:
            (w.stage / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in folder.iterdir()) == [store.IDS, "new.txt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [store.REPORT]  # no stage left behind


def test_erase_judges_stages_and_unknown_folders_by_their_ids(tmp_path):
    base = _root(tmp_path)
    stage = base / ".writing-scores-0123abcd"  # a write cut short after naming its ids
    stage.mkdir(parents=True)
    (stage / store.IDS).write_text(json.dumps(["x1", "x2"]))
    unknown = base / "original-000000000000"  # no ids.json: its ids are unknown, so it cannot be kept
    unknown.mkdir()
    clean = base / "runs" / "20250101T000000Z-abcdef-rum"
    clean.mkdir(parents=True)
    (clean / store.IDS).write_text(json.dumps(["y"]))
    erased = store.erase(Storage(tmp_path), lambda i: i == "x2")
    assert erased.paths == [str(stage), str(unknown)] and erased.mlflow_tags == ["scores", "original-000000000000"]
    assert clean.is_dir() and not stage.exists() and not unknown.exists()
    assert store.erase(Storage(tmp_path), lambda i: i == "x2").paths == []
    assert store.erase(Storage(tmp_path / "nothing-here"), lambda i: True).paths == []


@pytest.fixture(scope="module")
def doors(tmp_path_factory, tiny_backbone_dir):
    """A trained tiny S3T state after both doors ran: `s3t unlearn` (one run folder) and the three assets."""
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.memorization.config import MemorizationConfig
    from s3t_ops.memorization.service import (materialize_report, materialize_scores, materialize_unlearned, tracker_for,
                                              unlearn_command)

    root = tmp_path_factory.mktemp("mem-store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = root / "toy.csv"
        toy_frame(60).to_csv(data, index=False)
        cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
                        n_train=None, n_val=12, n_test=12, backbone=str(tiny_backbone_dir), state_dir=root / "state")
        engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
        engine.build_trunk()
        engine.train()
        state = cfg.state_dir
        uri = f"sqlite:///{root / 'mlflow.db'}"
        tiny = MemorizationConfig(epochs=1, lr=5e-3, batch_size=8)
        cli = unlearn_command(state, method="rum_f", n_forget=6, mcfg=tiny, tracking_uri=uri)
        materialize_scores(engine, tiny, holdout=False, inventory=False)
        materialize_unlearned(engine, "vanilla", "confidence", None, 6)
        report = materialize_report(engine, controls=False, tracker=tracker_for(engine, uri))
        train = set(engine.ledger.examples("train")["id"])
        val, test = (set(engine.ledger.examples(s)["id"]) for s in ("val", "test"))
        backup = root / "backup"
        shutil.copytree(_root(state), backup)
        yield {"state": state, "uri": uri, "cli": cli, "report": report, "train": train, "val": val, "test": test, "backup": backup}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def state(doors):
    """The state's memorization folder as the doors left it (restored for every test)."""
    shutil.rmtree(_root(doors["state"]), ignore_errors=True)
    shutil.copytree(doors["backup"], _root(doors["state"]))
    return doors["state"]


def test_every_artifact_names_its_ids_and_every_run_its_artifact(doors, state):
    from mlflow import MlflowClient

    run = f"runs/{Path(doors['cli']['json']).parent.name}"
    originals = {a for a in _artifacts(state) if a.startswith("original-")}
    assert _artifacts(state) == originals | {"scores", "unlearned", "report", run} and len(originals) == 1

    def ids(name: str) -> set[str]:
        return set(json.loads((_root(state) / name / store.IDS).read_text()))

    train, test = doors["train"], doors["test"]
    assert ids(originals.pop()) == train and ids("scores") == train  # no holdout proxy: validation unread
    assert ids("unlearned") == ids("report") == ids(run) == train | test  # accuracies and the MIA read the test split
    client = MlflowClient(doors["uri"])
    tags = [r.data.tags[store.ARTIFACT_TAG] for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(set(tags)) == sorted({run, "report"}) and len(tags) == 3 + 3  # original, oracle, rum_f; original, oracle, vanilla


def test_erase_of_a_training_example_removes_every_artifact_and_names_their_runs(doors, state):
    victim = doors["cli"]["forget_ids"][0]  # in the original model's training data, and the run's forget set
    erased = store.erase(Storage(state), lambda i: i == victim)
    run = f"runs/{Path(doors['cli']['json']).parent.name}"
    assert _artifacts(state) == set() and not any(_root(state).rglob("*.*"))  # no model, no list of ids is left
    assert {Path(p).name for p in erased.paths} == {p.split("/")[-1] for p in erased.mlflow_tags}
    assert {"scores", "unlearned", "report", run} <= set(erased.mlflow_tags) and len(erased.mlflow_tags) == 5
    assert store.erase(Storage(state), lambda i: i == victim) == store.Erased()  # a second call is a no-op


def test_erase_removes_nothing_for_an_id_no_artifact_used(doors, state):
    before = sorted(p.relative_to(state) for p in _root(state).rglob("*"))
    val = sorted(doors["val"])[0]  # validation: read only by the holdout proxy, which no artifact here computed
    for unused in ("not-an-example", val):
        assert store.erase(Storage(state), lambda i, u=unused: i == u) == store.Erased()
    assert sorted(p.relative_to(state) for p in _root(state).rglob("*")) == before


def test_erase_of_a_test_example_keeps_the_models_that_never_read_it(doors, state):
    victim = sorted(doors["test"])[0]
    erased = store.erase(Storage(state), lambda i: i == victim)
    run = f"runs/{Path(doors['cli']['json']).parent.name}"
    assert sorted(erased.mlflow_tags) == sorted(["report", run, "unlearned"])
    assert {a for a in _artifacts(state) if not a.startswith("original-")} == {"scores"}


def test_erase_finishes_what_a_crash_left(doors, state):
    base = _root(state)
    run = Path(doors["cli"]["json"]).parent
    (base / "report").rename(base / ".erasing-report")  # a crash right after the rename
    run.rename(run.with_name(".erasing-" + run.name))
    (run.with_name(".erasing-" + run.name) / "model.safetensors").unlink()  # ... and midway through the removal
    (base / "scores").rename(base / ".replaced-scores")  # an interrupted rewrite of the scores
    erased = store.erase(Storage(state), lambda i: False)
    assert sorted(erased.mlflow_tags) == sorted(["report", f"runs/{run.name}"])  # named again: the runs may still exist
    assert sorted(Path(p).name for p in erased.paths) == sorted([".erasing-report", ".replaced-scores", f".erasing-{run.name}"])
    assert not any(p.name.startswith(".") for p in base.rglob("*"))
    assert {"unlearned"} <= _artifacts(state) and store.erase(Storage(state), lambda i: False) == store.Erased()

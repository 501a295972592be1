"""MLflow through the engine's publisher: stage runs spanning training, the pyfunc ensemble under alias
champion, keyed deletion tags, descriptions, idempotent publishing, hard-deleted tainted versions."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from s3t_ops.tracker import plan_digest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir):
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.registry import MlflowPublisher
    from tests.conftest import toy_frame

    root = tmp_path_factory.mktemp("reg")
    data = root / "toy.csv"
    toy_frame(90).to_csv(data, index=False)
    cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4,
                    lora_alpha=8, n_train=None, n_val=10, n_test=10, backbone=str(tiny_backbone_dir), state_dir=root / "state")
    engine = S3T.create(cfg, data, progress=False, publisher=MlflowPublisher(root / "state", model_name="toy"))
    engine.tags = {"dagster_run_id": "r1"}
    engine.fit()
    return root, engine


def test_stage_runs_span_training_and_keep_config_apart_from_stage_counts(trained):
    root, engine = trained
    tracker = engine.publisher.tracker
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens runs, not GenAI traces
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`s3t.kind` = 'stage'")
    assert len(runs) == len({s.key for s in engine.stage_specs()})
    rows = engine.checkpoint_rows()
    for run in runs:
        row = rows[run.data.tags["s3t.checkpoint_key"]]
        assert run.data.tags["dagster_run_id"] == "r1"
        assert run.data.params["config.n_train"] == "None" and run.data.params["stage.n_examples"] == str(row["n_train"])
        assert run.info.end_time - run.info.start_time >= 0.8 * row["seconds"] * 1000  # the run spans the training
    history = tracker.client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert len(history) == engine.cfg.epochs


def test_champion_round_trip_and_forget_moves_it(trained):
    import mlflow.pyfunc

    root, engine = trained
    tracker = engine.publisher.tracker
    pid, record = engine.served()
    champ = tracker.champion()
    assert champ["plan_digest"] == plan_digest(record) and champ["plan_id"] == str(pid)
    assert json.loads(champ["tags"]["depths"]) == {"0": 2, "1": 2}
    assert f"S3T serving plan {pid}" in champ["description"]
    assert "exact unlearning" in tracker.client.get_registered_model("toy").description
    v1 = champ["version"]

    model = mlflow.pyfunc.load_model("models:/toy@champion")
    texts = ["great day number 1 !", "awful day number 2 ."]
    out = model.predict(pd.DataFrame({"text": texts}))
    names = engine.label_names
    assert list(out.columns) == ["label", *(f"prob_{n}" for n in names)]
    labels, probs = engine.ensemble(record).predict(texts)
    assert out["label"].tolist() == [names[i] for i in labels.tolist()]
    assert out[[f"prob_{n}" for n in names]].to_numpy() == pytest.approx(probs.double().numpy(), abs=1e-6)

    # a deletion: forget() alone moves the champion, and the tainted version is hard-deleted with its files
    victim = engine.examples("train")["id"].iloc[0]
    old_run = tracker.client.get_model_version("toy", str(v1)).run_id
    old_files = [p for p in (root / "state" / "mlartifacts").rglob("*.safetensors")]
    report = engine.forget([victim])
    champ = tracker.champion()
    assert champ["version"] == report.model_version > v1 and champ["plan_id"] == str(report.plan_id)
    honoured = champ["tags"]["honoured_deletions"].split(",")
    assert engine.ledger.tombstone(victim) in honoured and victim not in honoured  # keyed, never the raw id
    assert champ["tags"]["honoured_deletions_count"] == "1"
    assert [v["version"] for v in tracker.versions()] == [champ["version"]]
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        tracker.client.get_run(old_run)  # hard-deleted, not only marked deleted
    stale = {k for keys in record["checkpoints"].values() for k in keys} - {
        k for keys in engine.served()[1]["checkpoints"].values() for k in keys}
    assert stale and old_files and not [p for p in (root / "state" / "mlartifacts").rglob("*.safetensors") if p.stem in stale]
    every = engine.ledger.checkpoints(live_only=False)
    purged = set(every[every["purge_reason"].fillna("").str.startswith("stale")]["key"])
    assert stale <= purged and len(purged) == report.purged_checkpoints
    stage_runs = {r.data.tags["s3t.checkpoint_key"] for r in tracker.search("tags.`s3t.kind` = 'stage'", deleted=True)}
    assert stage_runs and not stage_runs & purged  # every stage run of a checkpoint that saw the example is hard-deleted
    assert stage_runs == set(engine.checkpoint_rows())  # the live checkpoints keep theirs
    from s3t_ops.erasure import registry_erasure

    assert tracker.purge_superseded(registry_erasure(engine.state)) == []  # idempotent; the champion is never purged


def test_publishing_is_idempotent(trained):
    """A plan gets one version: publishing again (a retry after a crash) reuses it, even without the alias."""
    root, engine = trained
    tracker = engine.publisher.tracker
    pid, record = engine.served()
    from s3t_ops.serving import bundle

    version = tracker.publish_plan(pid, record, bundle(engine.state))
    assert version == tracker.champion()["version"]
    tracker.client.delete_registered_model_alias("toy", "champion")  # as if a crash came before the alias moved
    assert tracker.publish_plan(pid, record, bundle(engine.state)) == version
    assert tracker.champion()["version"] == version
    assert len(tracker.versions()) == 1


def test_the_registry_does_not_export_its_tracking_uri(trained, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; a child process (a Dagster step,
    an `s3t` subprocess) would read it as the user's choice and refuse a state recorded with another store."""
    from s3t_ops.champion import load_champion
    from s3t_ops.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)  # mlflow writes on a change only
    _, eng = trained
    uri = f"sqlite:///{(eng.root / 'mlflow.db').resolve()}"
    Tracker(uri, model_name="toy")
    load_champion("toy", tracking_uri=uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    Tracker(uri, model_name="toy")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere.db"

"""MLflow registry: stage runs, the pyfunc ensemble under alias champion, deletion tags, purge of tainted versions."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from s3t_ops.registry import Tracker, plan_digest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir):
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from tests.conftest import toy_frame

    root = tmp_path_factory.mktemp("reg")
    data = root / "toy.csv"
    toy_frame(90).to_csv(data, index=False)
    cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4,
                    lora_alpha=8, n_train=None, n_val=10, n_test=10, backbone=str(tiny_backbone_dir), state_dir=root / "state")
    engine = S3T(cfg, progress=False)
    engine.ingest(data)
    engine.build_trunk()
    engine.train()
    return root, engine


def test_stage_runs_and_champion_round_trip(trained):
    import mlflow.pyfunc

    root, engine = trained
    tracker = Tracker(f"sqlite:///{root}/mlflow.db", model_name="toy", artifact_root=str(root / "art"))
    row = dict(engine._checkpoint_rows()[engine.stage_specs()[0].key])
    run_id = tracker.log_stage(row, engine.cfg.to_dict(), [1.0, 0.5], [0.4, 0.6], tags={"dagster_run_id": "r1"})
    run = tracker.client.get_run(run_id)
    assert run.data.tags["s3t.checkpoint_key"] == row["key"] and run.data.tags["dagster_run_id"] == "r1"
    assert run.data.params["shards"] == "2"
    history = tracker.client.get_metric_history(run_id, "train_loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0, 0.5]

    assert tracker.champion() is None
    pid, _ = engine.serve()
    record = engine.served()[1]
    v1 = tracker.register_plan(engine, pid, record)
    champ = tracker.champion()
    assert champ["version"] == v1 and champ["plan_digest"] == plan_digest(record)
    assert json.loads(champ["tags"]["depths"]) == {"0": 2, "1": 2}

    model = mlflow.pyfunc.load_model("models:/toy@champion")
    texts = ["great day number 1 !", "awful day number 2 ."]
    out = model.predict(pd.DataFrame({"text": texts}))
    names = engine.label_names
    assert list(out.columns) == ["label", *(f"prob_{n}" for n in names)]
    labels, probs = engine.ensemble(record).predict(texts)
    assert out["label"].tolist() == [names[i] for i in labels.tolist()]
    assert out[[f"prob_{n}" for n in names]].to_numpy() == pytest.approx(probs.double().numpy(), abs=1e-6)

    # a deletion: the new version honours it, the old (tainted) version is purged with its artifacts
    victim = engine.ledger.examples("train")["id"].iloc[0]
    report = engine.forget([victim])
    v2 = tracker.register_plan(engine, report.plan_id, engine.served()[1])
    champ = tracker.champion()
    assert champ["version"] == v2 > v1
    assert victim in champ["tags"]["honoured_deletions"].split(",")
    assert champ["tags"]["honoured_deletions_count"] == "1"
    old_run = tracker.client.get_model_version("toy", str(v1)).run_id
    assert tracker.purge_superseded(engine) == [v1]
    assert [v["version"] for v in tracker.versions()] == [v2]
    assert tracker.client.get_run(old_run).info.lifecycle_stage == "deleted"
    gone = {k for keys in record["checkpoints"].values() for k in keys} - {
        k for keys in engine.served()[1]["checkpoints"].values() for k in keys}
    assert gone and not [p for p in (root / "art").rglob("*.safetensors") if p.stem in gone]
    assert tracker.purge_superseded(engine) == []  # idempotent; the champion is never purged

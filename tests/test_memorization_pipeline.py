"""The memorization job in-process: scores (proxies + S3T inventory) -> unlearned model -> report + MLflow runs, each
recorded as a materialization of its (external) asset."""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import torch

from pipelines.definitions import build_definitions
from pipelines.settings import PipelineSettings
from tests.conftest import toy_frame


def test_memorization_assets_materialize_in_process(tmp_path, tiny_config):
    from mlflow import MlflowClient

    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.memorization.service import EXPERIMENT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tmp_path / "toy.csv"
        toy_frame(60).to_csv(data, index=False)
        cfg = tiny_config(epochs=1)
        engine = S3T.create(cfg, data, progress=False, publisher=Publisher())  # the S3T part of the pipeline, done by the engine directly
        engine.build_trunk()
        engine.train()
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        defs = build_definitions(PipelineSettings(cfg=cfg, tracking_uri=uri))
        run_config = {"ops": {
            "memorization_scores": {"config": {"epochs": 1, "lr": 5e-3, "subsampled": True, "subsample_models": 2}},
            "rum_unlearned": {"config": {"method": "rum_f", "proxy": "inventory", "n_forget": 6}},
            "unlearning_report": {"config": {"controls": True}},
        }}
        instance = dg.DagsterInstance.ephemeral()
        result = defs.resolve_job_def("memorization").execute_in_process(run_config=run_config, instance=instance)
        assert result.success
        for key in ("memorization_scores", "rum_unlearned", "unlearning_report"):  # shown on the asset, as materialized
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
        meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
        scores = meta["memorization_scores"]
        assert {"confidence", "holdout_retraining", "inventory", "memorization"} <= set(scores["columns"].data)
        assert set(scores["spearman_vs_memorization"].data) >= {"confidence", "inventory"}
        unlearned = meta["rum_unlearned"]
        assert unlearned["approximate"].value is True and sum(unlearned["bins"].data.values()) == 6
        report = meta["unlearning_report"]
        assert 0 <= report["tow"].value <= 1 and "rum_f_shuffle" in report["table"].value
        saved = json.loads(Path(report["report"].path).read_text())
        assert saved["approximate"] is True and set(saved["variants"]) == {"original", "oracle", "rum_f", "rum_f_shuffle", "vanilla"}
        assert Path(report["plot"].path).is_file()
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert len(runs) == 5 and all(r.data.tags["s3t.kind"] == "approximate_unlearning" and r.data.tags["approximate"] == "true"
                                      and r.data.tags["dagster_run_id"] == result.run_id for r in runs)
        # the exact S3T state is untouched by approximate unlearning
        assert S3T.open(cfg.state_dir, progress=False).ledger.deletions().empty
    finally:
        torch.set_num_threads(threads)

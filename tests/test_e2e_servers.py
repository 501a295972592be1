"""End to end with real servers on 127.0.0.1: `dagster dev` (temp DAGSTER_HOME) and `mlflow server`.

forget is launched through GraphQL; the champion alias must move to a version honouring it, then the
eager retraining policy must restore every stage and full depth. Servers are stopped afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import toy_frame
from tests.servers import free_port, stop, wait_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def test_forget_through_graphql_moves_champion_then_eager_retrain_restores_depth(tmp_path, tiny_backbone_dir, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.definitions import build_definitions
    from pipelines.settings import load_settings
    from s3t_ops.engine import S3T

    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    shutil.copy(REPO / "pipelines" / "dagster.yaml", home / "dagster.yaml")  # as the README says
    data = tmp_path / "toy.csv"
    toy_frame(90).to_csv(data, index=False)
    cfg = {"shards": 2, "slices": 2, "budget": 2, "epochs": 1, "batch_size": 8, "lr": 0.005, "max_tokens": 16, "lora_rank": 4,
           "lora_alpha": 8, "n_train": None, "n_val": 10, "n_test": 10, "backbone": str(tiny_backbone_dir)}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    mlflow_port, dagster_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "S3T_STATE": str(state), "S3T_CONFIG": str(tmp_path / "cfg.json"),
           "S3T_RETRAIN": "eager", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    for k in ("DAGSTER_HOME", "S3T_STATE", "S3T_CONFIG", "S3T_RETRAIN", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(k, env[k])

    procs: list[subprocess.Popen] = []
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("mlflow", "dagster")}
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "mlartifacts")],
            env=env, stdout=logs["mlflow"], stderr=subprocess.STDOUT, start_new_session=True))
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, procs[0])

        # initial full materialization into the same Dagster instance, before the servers read it
        defs = build_definitions(load_settings())
        with dg.DagsterInstance.get() as instance:
            dg.materialize([defs.resolve_assets_def("examples")], instance=instance,
                           run_config={"ops": {"examples": {"config": {"source": str(data)}}}})
            sd = defs.resolve_assets_def("slice_data")
            for key in sd.partitions_def.get_partition_keys():
                dg.materialize([sd], partition_key=key, instance=instance, selection=[sd])
            stages = [defs.resolve_assets_def(f"stage_{k}") for k in (1, 2)]
            for key in stages[0].partitions_def.get_partition_keys():
                dg.materialize(stages, partition_key=key, instance=instance)
            assert dg.materialize([defs.resolve_assets_def("s3t_ensemble")], instance=instance).success

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        v1 = client.get_model_version_by_alias("s3t-ensemble", "champion")
        victim = S3T.open(state, progress=False).ledger.examples("train")["id"].iloc[0]

        procs.append(subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dagster_port)],
            cwd=REPO, env=env, stdout=logs["dagster"], stderr=subprocess.STDOUT, start_new_session=True))
        wait_http(f"http://127.0.0.1:{dagster_port}/server_info", 180, procs[1])

        from dagster_graphql import DagsterGraphQLClient

        gql = DagsterGraphQLClient("127.0.0.1", port_number=dagster_port)
        run_id = _wait_for(lambda: _try_submit(gql, victim), 120, "the code location to accept a forget run", poll=2)
        t_submit = time.time()

        def moved():
            v = client.get_model_version_by_alias("s3t-ensemble", "champion")
            return v if v.version != v1.version else None

        v2 = _wait_for(moved, 240, "the champion alias to move after forget")
        champion_moved_s = time.time() - t_submit
        assert S3T.open(state, progress=False, repair=False).ledger.tombstone(victim) in v2.tags.get("honoured_deletions", "")
        # the alias moves inside the run; the run itself finishes a moment later
        status = _wait_for(lambda: (s := gql.get_run_status(run_id).value) in ("SUCCESS", "FAILURE", "CANCELED") and s,
                           120, "the forget run to finish")
        assert status == "SUCCESS"
        depths = json.loads(v2.tags["depths"])
        assert min(depths.values(), default=0) < 2  # honoured by deactivation, before any retraining

        def restored():
            v = client.get_model_version_by_alias("s3t-ensemble", "champion")
            d = json.loads(v.tags["depths"])
            return v if len(d) == 2 and all(x == 2 for x in d.values()) and not S3T.open(state, progress=False).missing_stages() else None

        v3 = _wait_for(restored, 420, "eager retraining to restore full depth", poll=3)
        assert int(v3.version) > int(v2.version)
        print(f"forget submitted -> champion moved in {champion_moved_s:.1f}s; full depth restored "
              f"{time.time() - t_submit:.1f}s after the request")
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs.values():
            f.close()
    assert all(p.poll() is not None for p in procs)


def _try_submit(gql, victim: str):
    from dagster_graphql import DagsterGraphQLClientError

    try:
        return gql.submit_job_execution("forget", run_config={"ops": {"forget_examples": {"config": {"ids": [victim]}}}})
    except DagsterGraphQLClientError:
        return None

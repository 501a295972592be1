"""Beyond one machine: S3T_EXECUTOR's executors, a Dask cluster of worker processes, a Postgres-backed instance.

The flow (benchmarks/scaling.py `flow`) runs in a coordinator process through `dagster.execute_job`:
ingest -> slice_data -> one run per (shard, sequence) for the stages -> forget one example -> the dirty
slice partition -> retrain the stale sequences -> serve. It runs twice, at once, in two state folders: on the
multiprocess executor with a Dagster instance on a PostgreSQL server this file starts (Debian's `postgresql`),
and on the Dask executor with a LocalCluster of two worker processes. Both must leave byte-identical checkpoints.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.scaling import dask_cluster, flow_env, free_port, run_flow
from pipelines.definitions import build_definitions
from pipelines.settings import EXECUTORS, PipelineSettings, load_settings
from tests.conftest import toy_frame

TINY = dict(shards=2, slices=2, budget=1, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
            n_train=None, n_val=12, n_test=12)
FLOW = {"forget": 1, "parallel": 2}
FLOW_TIMEOUT = 600  # each flow; both run at once, under the suite's 900 s per test


def _pg_bindir() -> Path | None:
    """The PostgreSQL server binaries (Debian: /usr/lib/postgresql/<version>/bin), or None when not installed."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        if out and (Path(out) / "initdb").is_file():
            return Path(out)
    except (OSError, subprocess.SubprocessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server(bindir: Path):
    """A throwaway PostgreSQL on 127.0.0.1 and a free port, database `dagster`; stopped and removed on exit.
    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user Debian creates."""
    import psycopg2

    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="s3t-pg-"))
    if as_pg:
        shutil.chown(tmp, "postgres", "postgres")
    data, port = tmp / "data", free_port()
    pg_ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    try:
        subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*pg_ctl, "-l", str(tmp / "server.log"), "-o", f"-h 127.0.0.1 -p {port} -k {tmp} -c fsync=off",
                        "start"], check=True, capture_output=True, timeout=90)
        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=10)
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE dagster")
        con.close()
        # SQLAlchemy >= 2.1 maps postgresql:// to psycopg 3; dagster-postgres installs psycopg2
        yield {"hostname": "127.0.0.1", "port": port, "username": "postgres", "db_name": "dagster", "scheme": "postgresql+psycopg2"}
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True, timeout=90, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def flow_inputs(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("scale")
    toy_frame(72).to_csv(root / "toy.csv", index=False)
    (root / "config.json").write_text(json.dumps({**TINY, "backbone": str(tiny_backbone_dir)}))
    return {"root": root, "config": root / "config.json", "spec": {**FLOW, "source": str(root / "toy.csv")}}


@pytest.fixture(scope="module")
def postgres():
    bindir = _pg_bindir()
    if bindir is None:
        yield None
        return
    with postgres_server(bindir) as db:
        yield db


@pytest.fixture(scope="module")
def flows(flow_inputs, postgres):
    """The flow twice, at once (separate processes; each one's waits leave CPU to the other): on the multiprocess
    executor with run/event/schedule storage in Postgres (when installed), and on the Dask executor against a
    LocalCluster of two worker processes started here and closed in `finally`, each in a state folder of its own."""
    from concurrent.futures import ThreadPoolExecutor

    root, spec = flow_inputs["root"], flow_inputs["spec"]
    home = root / "dagster-mp"
    home.mkdir()
    storage = f"storage:\n  postgres:\n    postgres_db:\n{_yaml(postgres, 6)}" if postgres else ""
    (home / "dagster.yaml").write_text(f"{storage}\ntelemetry:\n  enabled: false\n")
    mp_env = flow_env(root / "state-mp", flow_inputs["config"], home, "multiprocess")
    port = free_port()
    dask_env = flow_env(root / "state-dask", flow_inputs["config"], root / "dagster-dask", "dask", f"tcp://127.0.0.1:{port}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        mp = pool.submit(run_flow, mp_env, spec, FLOW_TIMEOUT)
        with dask_cluster(2, dask_env, port, timeout=120):
            dask = run_flow(dask_env, spec, timeout=FLOW_TIMEOUT)
        return {"multiprocess": {**mp.result(), "home": home}, "dask": dask}


def _yaml(values: dict, indent: int) -> str:
    return "".join(f"{' ' * indent}{k}: {v}\n" for k, v in values.items())


def test_dask_executor_train_forget_retrain_equals_multiprocess_bitwise(flows):
    """Two Dask worker processes train, forget and retrain; every checkpoint file is byte-identical to the
    multiprocess executor's, and the steps ran on both workers, never in the coordinator."""
    dask, mp = flows["dask"], flows["multiprocess"]
    assert dask["checkpoints"] and dask["checkpoints"] == mp["checkpoints"]  # same lineage positions, same bytes (sha256 of each file)
    assert dask["served_plan"] == mp["served_plan"] and dask["missing_after"] == mp["missing_after"] == 0
    assert dask["victims"] == mp["victims"] and len(dask["victims"]) == 1
    stage_steps = [s for s in dask["steps"] if s["step"].startswith("stage_")]
    assert {s["phase"] for s in stage_steps} == {"stages", "retrain"}
    assert all(s["status"] == "STEP_SUCCESS" for s in dask["steps"])
    pids = {s["pid"] for s in dask["steps"]}
    assert len({s["pid"] for s in stage_steps}) == 2 and dask["coordinator_pid"] not in pids  # two worker processes
    # every run's steps are its own (one Dask task per run and step): one stage_1 step per (shard, sequence)
    firsts = [s["partition"] for s in stage_steps if s["step"] == "stage_1" and s["phase"] == "stages"]
    assert sorted(firsts) == sorted(set(firsts)) and len(firsts) == TINY["shards"] * TINY["budget"]


def test_postgres_instance_holds_the_run_history(postgres, flows):
    """dagster-postgres run, event and schedule storage against a real PostgreSQL: the flow succeeded with it,
    and every run of the flow is in Postgres with its materializations (no SQLite run storage was written)."""
    if postgres is None:
        pytest.skip("PostgreSQL server binaries are not installed (Debian: apt-get install postgresql)")
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    flow = flows["multiprocess"]
    with dg.DagsterInstance.from_config(str(flow["home"])) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert not (flow["home"] / "history").exists()  # the SQLite run storage's folder
    con = psycopg2.connect(host=postgres["hostname"], port=postgres["port"], user="postgres", dbname="dagster", connect_timeout=10)
    try:
        cur = con.cursor()
        cur.execute("SELECT run_id, status FROM runs")
        runs = dict(cur.fetchall())
        cur.execute("SELECT asset_key, count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key")
        materialized = {dg.AssetKey.from_db_string(k).to_user_string(): n for k, n in cur.fetchall()}
    finally:
        con.close()
    assert set(runs) == set(flow["runs"]) and set(runs.values()) == {"SUCCESS"}
    n_stage_steps = sum(1 for s in flow["steps"] if s["step"].startswith("stage_"))
    assert materialized["examples"] == 1 and materialized["s3t_ensemble"] == 1
    assert sum(n for k, n in materialized.items() if k.startswith("stage_")) == n_stage_steps  # one per partition
    assert materialized["slice_data"] == TINY["shards"] * TINY["slices"] + 1  # every slice, then the dirty one


def test_every_executor_setting_loads_and_k8s_config_validates(tmp_path):
    from dagster_k8s.job import get_user_defined_k8s_config

    names = {}
    for executor in EXECUTORS:
        env = {"S3T_STATE": str(tmp_path / executor), "S3T_EXECUTOR": executor, "S3T_K8S_CPU": "2", "S3T_K8S_MEMORY": "6Gi"}
        defs = build_definitions(load_settings(env))
        job = defs.resolve_implicit_global_asset_job_def()
        names[executor] = job.executor_def.name
        tags = defs.resolve_assets_def("stage_1").op.tags
        if executor == "k8s":
            k8s = get_user_defined_k8s_config(tags)  # parsed and validated as the k8s executor reads each step
            assert k8s.container_config["resources"]["requests"] == {"cpu": "2", "memory": "6Gi"}
            config = {"execution": {"config": {"job_namespace": "s3t", "job_image": "registry.example/s3t:1",
                                               "max_concurrent": 4, "env_vars": ["S3T_STATE=/mnt/s3t_state"],
                                               "volume_mounts": [{"name": "state", "mount_path": "/mnt/s3t_state"}],
                                               "volumes": [{"name": "state", "persistent_volume_claim": {"claim_name": "s3t-state"}}]}}}
            assert dg.validate_run_config(job, config)["execution"]["k8s"]["job_namespace"] == "s3t"
            with pytest.raises(dg.DagsterInvalidConfigError):
                dg.validate_run_config(job, {"execution": {"config": {"max_concurrent": "many"}}})
        else:
            assert "dagster-k8s/config" not in tags
    assert names == {"multiprocess": "multi_or_in_process_executor", "dask": "dask", "k8s": "k8s"}

    for extra in ({"S3T_DASK_WORKERS": "3"}, {"S3T_DASK_ADDRESS": "tcp://scheduler:8786"}):
        settings = load_settings({"S3T_STATE": str(tmp_path / "d"), "S3T_EXECUTOR": "dask", **extra})
        job = build_definitions(settings).resolve_implicit_global_asset_job_def()
        assert dg.validate_run_config(job, {})  # configured from the settings: no run config needed
    assert (settings.dask_address, settings.dask_workers) == ("tcp://scheduler:8786", 2)
    for bad, message in (({"S3T_EXECUTOR": "spark"}, "S3T_EXECUTOR"), ({"S3T_DASK_WORKERS": "two"}, "S3T_DASK_WORKERS"),
                         ({"S3T_DASK_WORKERS": "0"}, "S3T_DASK_WORKERS")):
        with pytest.raises(ValueError, match=message):
            load_settings({"S3T_STATE": str(tmp_path / "bad"), **bad})
    assert PipelineSettings(cfg=load_settings({"S3T_STATE": str(tmp_path)}).cfg).executor == "multiprocess"

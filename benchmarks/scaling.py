"""Scaling out: stage training on Dagster's Dask executor with 1 and 2 worker processes, and a model of the
wall time of S3T's m*B chains of L stages on N machines, extrapolated to the full packaged corpus.

1. Measured. The pipeline runs through `dagster.execute_job` with S3T_EXECUTOR=dask against a local Dask
   cluster of W worker processes (one torch thread each), W = 1 and 2, each on a fresh state: ingest ->
   slice_data -> stage_1..L -> serve. Stages run as one Dagster run per (shard, sequence) partition (the
   runs the nightly schedule and the deletion sensor issue), all submitted at once, so W workers train W
   chains at a time. Reported: the stage phase's wall time, the summed training seconds (work), each
   stage's cost c_k, and the per-step overhead o (wall time not spent training, per step, at W = 1).
2. Model. m*B independent chains, stage_1 -> ... -> stage_L, stage k costing c_k + o. Work = m*B*sum(c_k + o);
   critical path = one chain = sum(c_k + o). On N machines (one worker each, as measured here) the makespan
   of greedy list scheduling is simulated; it is bounded below by max(critical path, work / N). Stage costs
   are linear in the examples per shard, so the full packaged corpus (every tweet outside val/test)
   multiplies c_k by n_full / n_measured; o stays. More torch threads per machine would shrink c_k by an
   intra-op speedup this 2-core machine does not measure.

The CPU may be shared (the load average before and after each measurement is recorded).

    .venv/bin/python -m benchmarks.scaling --out benchmarks/measured          # MiniLM, about 12 minutes here
    .venv/bin/python -m benchmarks.scaling --quick --backbone DIR --out /tmp/r  # a smoke run on a tiny model

Writes <out>/scaling.json and <out>/scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ROOT, base_parser, fresh_dir, lineage_checksums, lineage_positions, machine, make_config,
                               model_args, plt, write_json)

NAME = "scaling"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


# --- running the pipeline through Dagster's executors (also used by tests/test_scale.py) -----------------------

def s3t_asset_job():
    """The `s3t` code location's asset job, reconstructable as `dagster dev` loads it (workspace.yaml: the module
    pipelines.definitions, attribute defs). Every process that runs a step (a Dask worker, a multiprocess
    child) imports that module, which reads S3T_STATE, S3T_CONFIG and S3T_EXECUTOR from its environment."""
    from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module("pipelines.definitions", "defs", working_directory=str(ROOT))
    return repo.get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)


def flow_env(state: Path, config: Path, dagster_home: Path, executor: str, dask_address: str = "",
             threads: int = 1) -> dict[str, str]:
    """The environment of a coordinator and of its workers: they load the same definitions and instance."""
    state, config, dagster_home = (Path(p).resolve() for p in (state, config, dagster_home))  # DAGSTER_HOME must be absolute
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3T_", "MLFLOW_", "DAGSTER_"))}
    env.update(S3T_STATE=str(state), S3T_CONFIG=str(config), S3T_EXECUTOR=executor, DAGSTER_HOME=str(dagster_home),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    if dask_address:
        env["S3T_DASK_ADDRESS"] = dask_address
    Path(dagster_home).mkdir(parents=True, exist_ok=True)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dask_cluster(n_workers: int, env: dict[str, str], port: int, timeout: float = 120):
    """A distributed.LocalCluster of `n_workers` worker PROCESSES (one thread each, so torch state is per
    worker) on 127.0.0.1:`port`, workers started with `env`; closed on exit. Yields the scheduler address."""
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                           scheduler_port=port, dashboard_address=":0", silence_logs=logging.ERROR, env=env,
                           memory_limit=0)
    try:
        with Client(cluster, timeout=timeout) as client:
            client.wait_for_workers(n_workers, timeout=timeout)
            client.run(_warm_worker)  # imports and the backbone, once per worker, outside the timed runs
        yield cluster.scheduler_address
    finally:
        cluster.close(timeout=timeout)


def _warm_worker() -> int:
    from pipelines.definitions import defs

    defs.resources["s3t"]._backbone()
    return os.getpid()


def run_flow(env: dict[str, str], spec: dict, timeout: float) -> dict:
    """`flow(spec)` in a fresh coordinator process with `env` (definitions read it when they load), in its own
    process group: on timeout the coordinator and every process it started are killed."""
    out = Path(env["DAGSTER_HOME"]) / f"flow-{time.time_ns()}.json"
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", "--flow", str(spec_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise RuntimeError(f"flow timed out after {timeout}s:\n{stderr[-6000:]}") from None
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"flow failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-6000:]}")
    return json.loads(out.read_text())


def run_one(spec: dict) -> dict:
    """One asset run through `execute_job` in THIS process, with the definitions' executor: its id and steps.
    The assets alone: their checks run in the `serve` job (each check is a step, a process under multiprocess)."""
    import dagster as dg

    job = s3t_asset_job().get_subset(asset_selection={dg.AssetKey(a) for a in spec["assets"]}, asset_check_selection=set())
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(job, instance, run_config=spec.get("run_config"), tags=spec.get("tags"))
        if not result.success:
            raise RuntimeError(f"run {result.run_id} of {spec['assets']} failed: {_failure(instance, result.run_id)}")
        return {"run_id": result.run_id, "steps": _steps(instance, result.run_id)}


def flow(spec: dict) -> dict:
    """In THIS process: ingest -> slice_data -> stages (one run per (shard, sequence), `parallel` at a time);
    with spec["forget"] > 0, then forget that many examples (the `forget` job), re-materialize the dirty
    slice_data partitions and retrain each stale sequence from its first stale stage; then serve.

    Asset runs go through `execute_job` with the definitions' executor. The stage runs go to `parallel` run
    processes, started and warmed before anything is timed (a run launcher's job: Dagster's run setup
    reconfigures logging, and two runs in threads of one process deadlocked on the logging locks); `forget`
    and `serve` are in-process jobs (they train nothing)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import dagster as dg

    from pipelines.definitions import defs
    from pipelines.partitions import S3TPartitions
    from s3t_ops.engine import S3T

    state = os.environ["S3T_STATE"]
    L = len([a for a in defs.assets if a.key.to_user_string().startswith("stage_")])
    steps: list[dict] = []
    phases: dict[str, float] = {}
    runs: list[str] = []

    def record(phase: str, tags: dict | None, out: dict) -> None:
        steps.extend({**s, "phase": phase, "partition": (tags or {}).get("dagster/partition")} for s in out["steps"])
        runs.append(out["run_id"])

    def execute(phase: str, assets: list[str], tags: dict | None = None, run_config: dict | None = None) -> None:
        record(phase, tags, run_one({"assets": assets, "tags": tags, "run_config": run_config}))

    def in_process(job: str, **kw):
        with dg.DagsterInstance.get() as instance, _own_tracking_uri():
            result = defs.resolve_job_def(job).execute_in_process(instance=instance, **kw)
            assert result.success, f"{job} failed"
            runs.append(result.run_id)
            return result

    def timed(phase: str, fn):
        t0 = time.perf_counter()
        result = fn()
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0
        print(f"flow: {phase} done after {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return result

    def chains(phase: str, first: dict[str, int]) -> None:
        """One run per stage partition, stage_k0..stage_L, on the run processes."""
        tags = {key: {"dagster/partition": key} for key in first}
        futures = {key: runners.submit(run_one, {"assets": [f"stage_{k}" for k in range(k0, L + 1)], "tags": tags[key]})
                   for key, k0 in sorted(first.items())}
        for key, future in futures.items():
            record(phase, tags[key], future.result())

    stage_keys = defs.resolve_assets_def("stage_1").partitions_def.get_partition_keys()
    slice_keys = defs.resolve_assets_def("slice_data").partitions_def.get_partition_keys()
    timed("ingest", lambda: execute("ingest", ["examples"], run_config={"ops": {"examples": {"config": {"source": spec["source"]}}}}))
    timed("slice_data", lambda: execute("slice_data", ["slice_data"], {RANGE_START: slice_keys[0], RANGE_END: slice_keys[-1]}))
    parallel = max(1, spec.get("parallel") or len(stage_keys))
    runners = ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"))
    list(runners.map(_warm_runner, [1.0] * parallel))
    timed("stages", lambda: chains("stages", {key: 1 for key in stage_keys}))
    victims: list[str] = []
    if spec.get("forget"):
        victims = S3T.open(state, progress=False, repair=False).examples("train")["id"].sort_values().iloc[:spec["forget"]].tolist()
        forgot = timed("forget", lambda: in_process("forget", run_config={"ops": {"forget_examples": {"config": {"ids": victims}}}}))
        for s, j in forgot.output_for_node("forget_examples")["dirty"]:  # what the deletion sensor requests
            timed("refresh_slices", partial(execute, "refresh_slices", ["slice_data"], {"dagster/partition": S3TPartitions.slice_partition(s, j)}))
        first: dict[str, int] = {}
        for stale in S3T.open(state, progress=False, repair=False).missing_stages():
            key = S3TPartitions.stage_partition(stale.shard, stale.seq)
            first[key] = min(stale.stage, first.get(key, stale.stage))
        timed("retrain", lambda: chains("retrain", first))
    runners.shutdown()
    timed("serve", lambda: in_process("serve"))
    engine = S3T.open(state, progress=False, repair=False)
    # two states name the same training differently: compare them by lineage position (benchmarks/common.py)
    where = lineage_positions(engine)
    served = engine.served()[1]
    return {
        "phases": phases, "steps": steps, "runs": runs, "victims": victims, "coordinator_pid": os.getpid(),
        "checkpoints": lineage_checksums(engine),
        "served_plan": {"plan": served["plan"], "checkpoints": {s: [where[k] for k in keys] for s, keys in served["checkpoints"].items()}},
        "missing_after": len(engine.missing_stages()),
    }


def _warm_runner(pause: float) -> int:
    """A run process's imports, before the timed runs (the pause lets every process of the pool take one)."""
    import dagster  # noqa: F401

    import pipelines.definitions  # noqa: F401

    time.sleep(pause)
    return os.getpid()


@contextmanager
def _own_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI to this process's environment, which the
    multiprocess executor's step processes would inherit (and the engine refuses a URI naming the state's own
    store). A deployment runs each run in its own process; here the coordinator restores its environment."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _steps(instance, run_id: str) -> list[dict]:
    """Each step of a run: where it ran (pid), when, and the training seconds its materializations report."""
    out: dict[str, dict] = {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not entry.step_key:
            continue
        s = out.setdefault(entry.step_key, {"step": entry.step_key, "train_seconds": 0.0, "engine_seconds": 0.0})
        kind = ev.event_type_value
        if kind == "STEP_START":
            s.update(pid=ev.pid, start=entry.timestamp)
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            s.update(end=entry.timestamp, status=kind)
        elif kind == "ASSET_MATERIALIZATION":
            md = entry.asset_materialization.metadata
            for name in ("train_seconds", "engine_seconds"):
                if name in md:
                    s[name] += float(md[name].value)
    return list(out.values())


def _failure(instance, run_id: str) -> str:
    errors = [str(e.dagster_event.event_specific_data.error) for e in instance.all_logs(run_id)
              if e.dagster_event and e.dagster_event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE")
              and getattr(e.dagster_event.event_specific_data, "error", None)]
    return "\n".join(errors)[-4000:] or "see the run's logs"


# --- the model -----------------------------------------------------------------------------------------------

def makespan(n_chains: int, costs: list[float], machines: int) -> float:
    """Greedy list scheduling of `n_chains` identical chains (stages in order, `costs` each) on `machines`:
    the first free machine takes a ready stage of the chain with the most work left."""
    left = [0] * n_chains  # next stage index per chain
    ready = [0.0] * n_chains
    free = [0.0] * machines
    done = 0
    end = 0.0
    while done < n_chains * len(costs):
        m = min(range(machines), key=free.__getitem__)
        todo = [c for c in range(n_chains) if left[c] < len(costs)]
        now = max(free[m], min(ready[c] for c in todo))
        c = max((c for c in todo if ready[c] <= now), key=lambda c: (sum(costs[left[c]:]), -c))
        finish = now + costs[left[c]]
        free[m] = ready[c] = finish
        left[c] += 1
        done += 1
        end = max(end, finish)
    return end


def model(n_chains: int, stage_costs: list[float], overhead: float, machines: list[int]) -> dict:
    per_step = [c + overhead for c in stage_costs]
    chain, work = sum(per_step), n_chains * sum(per_step)
    rows = [{"machines": n, "wall_s": makespan(n_chains, per_step, n), "lower_bound_s": max(chain, work / n)} for n in machines]
    one = rows[0]["wall_s"] if machines[0] == 1 else makespan(n_chains, per_step, 1)
    for r in rows:
        r["speedup"] = one / r["wall_s"]
        r["efficiency"] = r["speedup"] / r["machines"]
    return {"chains": n_chains, "step_costs_s": per_step, "critical_path_s": chain, "work_s": work, "rows": rows}


# --- the benchmark -------------------------------------------------------------------------------------------

def measure(args, workers: int, root: Path) -> dict:
    state = root / f"w{workers}"
    cfg = make_config(args, state / "state")
    config = state / "config.json"
    state.mkdir(parents=True)
    config.write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "state_dir"}))
    port = free_port()
    env = flow_env(state / "state", config, state / "dagster", "dask", f"tcp://127.0.0.1:{port}", args.threads or 1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with dask_cluster(workers, env, port):
        started = time.perf_counter() - t0
        print(f"{workers} worker(s) up and warm in {started:.1f}s; running the pipeline ...", flush=True)
        result = run_flow(env, {"source": args.source or "tweets", "forget": 0}, timeout=3600)
    stage_steps = [s for s in result["steps"] if s["phase"] == "stages"]
    train = sum(s["train_seconds"] for s in stage_steps)
    wall = result["phases"]["stages"]
    L = cfg.slices
    per_stage = {k: sorted(s["train_seconds"] for s in stage_steps if s["step"] == f"stage_{k}") for k in range(1, L + 1)}
    out = {
        "workers": workers, "cluster_start_s": started, "phases_s": result["phases"], "stage_wall_s": wall,
        "stage_train_s": train, "steps": len(stage_steps), "chains": len({s["partition"] for s in stage_steps}),
        "stage_cost_median_s": [per_stage[k][len(per_stage[k]) // 2] for k in range(1, L + 1)],
        "overhead_per_step_s": (wall * workers - train) / len(stage_steps),
        "worker_pids": sorted({s["pid"] for s in stage_steps}), "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0], "checkpoints": len(result["checkpoints"]),
    }
    print(f"{workers} worker(s): stages {wall:.1f}s wall, {train:.1f}s training in {out['steps']} steps "
          f"(load {load_before:.2f} -> {out['load_avg_1m_after']:.2f})", flush=True)
    return out


def full_corpus_train(n_val: int, n_test: int) -> int:
    from s3t_ops.data import build_dataset, load_source

    return len(build_dataset(load_source(None), None, n_val, n_test).split("train"))


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    model_args(p, shards=3, slices=3, budget=3, n_train=450, n_val=60, n_test=60, epochs=2)
    p.add_argument("--workers", default="1,2", help="Dask worker processes to measure, comma-separated")
    p.add_argument("--machines", default="1,2,4,8,16,32", help="machine counts of the model, comma-separated (starting at 1)")
    p.add_argument("--full-train", type=int, default=None, help="training examples of the extrapolation "
                   "(default: every packaged tweet outside the default val/test split)")
    p.add_argument("--flow", default=None, help=argparse.SUPPRESS)  # internal: one coordinator (run_flow)
    args = p.parse_args(argv)
    if args.flow:
        spec = json.loads(Path(args.flow).read_text())
        Path(spec["out"]).write_text(json.dumps(flow(spec), default=str))
        return {}
    t_start = time.perf_counter()
    out = Path(args.out)
    info = machine()
    root = fresh_dir(out / "state-scaling")
    try:
        measured = [measure(args, int(w), root) for w in args.workers.split(",")]
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    cfg = make_config(args, root)
    base = measured[0]
    n_chains = cfg.shards * cfg.budget
    machines = [int(n) for n in args.machines.split(",")]
    from s3t_ops.config import S3TConfig

    defaults = S3TConfig()
    n_full = args.full_train or full_corpus_train(defaults.n_val, defaults.n_test)
    n_measured = cfg.n_train
    scale = n_full / n_measured
    here = model(n_chains, base["stage_cost_median_s"], base["overhead_per_step_s"], sorted({1, *[m["workers"] for m in measured]}))
    full = model(n_chains, [c * scale for c in base["stage_cost_median_s"]], base["overhead_per_step_s"], machines)
    result = {
        "benchmark": NAME, "args": vars(args), "machine": info, "config": {k: v for k, v in cfg.to_dict().items() if k != "state_dir"},
        "measured": measured,
        "speedup_measured": measured[0]["stage_wall_s"] / measured[-1]["stage_wall_s"] if len(measured) > 1 else None,
        "model_at_measured_size": here, "full_corpus": {"n_train": n_full, "scale": scale, **full},
        "model_assumptions": ("one worker per machine with the measured single-thread stage costs; stage cost linear in the "
                              "examples per shard; per-step overhead constant; data (ingest, trunk) and serving not modelled; "
                              "the state folder reachable from every machine (shared storage, docs/scaling.md)"),
    }
    for m in measured:
        pred = next((r["wall_s"] for r in here["rows"] if r["machines"] == m["workers"]), None)
        m["model_wall_s"] = pred
    result["seconds"] = time.perf_counter() - t_start
    _plot(result, out / f"{NAME}.png")
    result["png"] = str(out / f"{NAME}.png")
    path = write_json(out, NAME, result)
    print(f"wrote {path}")
    return result


def _plot(result: dict, png: Path) -> None:
    pyplot = plt()
    fig, (a, b) = pyplot.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    ms = result["measured"]
    x = list(range(len(ms)))
    a.bar([i - 0.2 for i in x], [m["stage_wall_s"] for m in ms], 0.4, label="stage phase, wall", color="tab:blue")
    a.bar([i + 0.2 for i in x], [m["stage_train_s"] for m in ms], 0.4, label="training seconds (work)", color="tab:grey")
    a.plot(x, [m["model_wall_s"] for m in ms], "kx", markersize=9, label="model")
    a.set_xticks(x, [f"{m['workers']} Dask worker(s)\nload {m['load_avg_1m_before']:.1f}" for m in ms], fontsize=8)
    a.set_ylabel("seconds")
    cfg = result["config"]
    a.set_title(f"measured: m={cfg['shards']}, L={cfg['slices']}, B={cfg['budget']}, {cfg['n_train']} examples", fontsize=9)
    a.legend(fontsize=8)
    full = result["full_corpus"]
    n = [r["machines"] for r in full["rows"]]
    b.plot(n, [r["wall_s"] / 3600 for r in full["rows"]], "o-", label="model (list scheduling)")
    b.plot(n, [full["work_s"] / k / 3600 for k in n], ":", color="tab:grey", label="work / N")
    b.axhline(full["critical_path_s"] / 3600, ls="--", color="tab:red", label="critical path (one chain)")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("machines (one worker, one torch thread each)")
    b.set_ylabel("hours to train every stage")
    b.set_title(f"extrapolated: {full['n_train']} training tweets, {full['chains']} chains of {cfg['slices']} stages", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    pyplot.close(fig)


if __name__ == "__main__":
    main()

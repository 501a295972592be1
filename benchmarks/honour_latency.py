"""Honour latency through every door, and bulk deletion.

1. CLI door: `s3t forget ID --json` in a fresh process, once per request (>= 5). Measured from the
   moment the process is spawned to the moment the registry's `champion` serves the honouring plan,
   plus the engine's own split: honour (ledger transaction) and publish (MLflow version + alias).
2. UI door (`--ui`): `dagster dev` on the same kind of state; the `forget` job is submitted through
   GraphQL, as the Launchpad does, and the champion alias is polled in the MLflow store. Measured from
   submission to the alias moving; the run's own metadata gives the time inside the run.
3. Bulk: one request with N ids (default 10,000) on a ledger of the packaged tweets (no training: the
   honour path is the ledger transaction and the plan), against single-id requests on the same ledger.

The state for 1-2 is the demo's shape (m=3, L=3, B=3 on MiniLM: 27 stage checkpoints) with fewer
examples and one epoch, since training time does not enter the measurement. Writes
<out>/honour_latency.json and .png.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import DagsterDev, apply_threads, base_parser, clean_env, fresh_dir, machine, plt, write_json

NAME = "honour_latency"


def _env(**extra: str) -> dict[str, str]:
    return clean_env(OMP_NUM_THREADS="1", **extra)


def _state(args, path: Path):
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T

    cfg = S3TConfig(shards=args.shards, slices=args.slices, budget=args.slices, epochs=1, n_train=args.n_train, n_val=100,
                    n_test=100, backbone=args.backbone, state_dir=path)
    engine = S3T.create(cfg, None, progress=not args.quiet)
    engine.fit()
    return engine


def _victims(engine, n: int) -> list[str]:
    train = engine.examples("train").sort_values("id")
    return train["id"].iloc[:: max(1, len(train) // n)].iloc[:n].tolist()


def cli_door(args, state: Path, victims: list[str]) -> list[dict]:
    rows = []
    for i, victim in enumerate(victims, 1):
        t0 = time.time()
        r = subprocess.run([str(Path(sys.executable).with_name("s3t")), "forget", victim, "--state", str(state), "--json"],
                           capture_output=True, text=True, env=_env(), timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"request": i, "champion_moved_s": out["champion_moved_at"] - t0, "honour_s": out["honour_s"],
                     "publish_s": out["publish_s"], "erase_s": out["erase_s"], "process_s": time.time() - t0,
                     "model_version": out["model_version"]})
        if not args.quiet:
            print(f"CLI request {i}: champion moved {rows[-1]['champion_moved_s']:.2f}s after spawn "
                  f"(honour {out['honour_s'] * 1000:.0f} ms, publish {out['publish_s']:.2f}s)", flush=True)
    return rows


RUN_TIMES = "query($runId: ID!) { runOrError(runId: $runId) { ... on Run { creationTime startTime endTime } } }"


def run_times(port: int, run_id: str) -> dict:
    """A run's creation, start and end (epoch seconds) as Dagster recorded them."""
    body = json.dumps({"query": RUN_TIMES, "variables": {"runId": run_id}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]["runOrError"]


def run_split(home: Path, run_id: str, t_submit: float, moved: float) -> dict:
    """Where a UI forget's time goes, from the run's event log (seconds): waiting in the queue, the daemon launching
    the run process until it starts (imports, loading the code location), the run's own setup until the step starts,
    then inside the step opening the state (imports of the engine and MLflow, repair check) and the engine's honour
    and publish (the op's output metadata)."""
    import dagster as dg
    from dagster import DagsterEventType as E

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.all_logs(run_id)
    first: dict[str, float] = {}
    meta: dict[str, float] = {}
    for rec in records:
        ev = rec.dagster_event
        if ev is None:
            continue
        first.setdefault(ev.event_type.name, rec.timestamp)
        if ev.event_type == E.STEP_OUTPUT:
            for key, value in (ev.event_specific_data.metadata or {}).items():
                if key in ("honour_ms", "champion_moved_ms"):
                    meta[key] = float(getattr(value, "value", value))
    dequeued = first.get("RUN_DEQUEUED", first.get("RUN_STARTING"))
    start, step = first.get("RUN_START"), first.get("STEP_START")
    if None in (dequeued, start, step) or "champion_moved_ms" not in meta:
        return {}
    engine_s = meta["champion_moved_ms"] / 1000
    return {"queue_s": dequeued - t_submit, "process_start_s": start - dequeued, "run_setup_s": step - start,
            "open_state_s": moved - (step - t_submit) - engine_s, "honour_s": meta["honour_ms"] / 1000,
            "publish_s": engine_s - meta["honour_ms"] / 1000}


def ui_door(args, state: Path, victims: list[str], home: Path) -> list[dict]:
    from dagster_graphql import DagsterGraphQLClient

    from s3t_ops.tracker import Tracker, default_tracking_uri

    rows = []
    with DagsterDev(home, _env(S3T_STATE=str(Path(state).resolve()))) as dev:
        gql = DagsterGraphQLClient("127.0.0.1", port_number=dev.port)
        tracker = Tracker(default_tracking_uri(state))
        for i, victim in enumerate(victims, 1):
            before = tracker.champion()["plan_id"]
            t0 = time.time()
            while True:  # the code location may still be loading
                try:
                    run_id = gql.submit_job_execution("forget", run_config={"ops": {"forget_examples": {"config": {"ids": [victim]}}}})
                    break
                except Exception:
                    if time.time() - t0 > 300:
                        raise
                    time.sleep(1)
            t_submit = time.time()
            while tracker.champion()["plan_id"] == before:  # a plan with the same checkpoints keeps its version
                if time.time() - t_submit > 300:
                    raise RuntimeError("the champion never moved")
                time.sleep(0.1)
            moved = time.time() - t_submit
            while gql.get_run_status(run_id).value not in ("SUCCESS", "FAILURE", "CANCELED"):
                time.sleep(0.5)
            times = run_times(dev.port, run_id)
            # before the run starts: the queue, the daemon launching a process, that process importing the code location
            rows.append({"request": i, "champion_moved_s": moved, "run_id": run_id, "until_run_start_s": times["startTime"] - t_submit,
                         "run_start_to_champion_s": moved - (times["startTime"] - t_submit), "run_s": times["endTime"] - times["startTime"],
                         "split": run_split(dev.home, run_id, t_submit, moved)})
            if not args.quiet:
                split = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in rows[-1]["split"].items())
                print(f"UI request {i}: champion moved {moved:.2f}s after submission (run started after "
                      f"{rows[-1]['until_run_start_s']:.2f}s; {split})", flush=True)
    return rows


def bulk(args, root: Path) -> dict:
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.serving import plan_in

    cfg = S3TConfig(shards=5, slices=3, budget=3, n_train=args.bulk_n_train, n_val=500, n_test=500, backbone=args.backbone,
                    state_dir=root / "bulk")
    engine = S3T.create(cfg, None, progress=False, publisher=Publisher())
    ids = engine.examples("train")["id"].tolist()
    batch, singles = ids[: args.bulk], ids[args.bulk: args.bulk + args.singles]
    single_s = []
    for i in singles:
        t = time.perf_counter()
        engine.ledger.honour([i], plan_in(engine.state))
        single_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    receipt = engine.ledger.honour(batch, plan_in(engine.state))
    honour_s = time.perf_counter() - t
    t = time.perf_counter()
    report = engine.forget(batch[:1])  # already deleted: erasure of everything pending (the ledger's compaction)
    erase_s = time.perf_counter() - t
    assert len(receipt.new) == len(batch) and report.already
    out = {"ledger_examples": len(ids) + 1000, "bulk_ids": len(batch), "bulk_honour_s": honour_s,
           "bulk_per_id_us": honour_s / len(batch) * 1e6, "bulk_erase_s": erase_s, "single_honour_s_mean": float(np.mean(single_s)),
           "single_requests": len(singles), "deletions_in_one_transaction": len(receipt.new)}
    if not args.quiet:
        print(f"bulk: {len(batch)} ids honoured in one transaction in {honour_s:.2f}s ({out['bulk_per_id_us']:.0f} µs/id); "
              f"a single-id request takes {out['single_honour_s_mean'] * 1000:.0f} ms; erasure {erase_s:.2f}s", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4), dpi=120)
    for name, color in (("cli", "tab:blue"), ("ui", "tab:orange")):
        rows = result.get(name) or []
        if rows:
            ax.plot([r["request"] for r in rows], [r["champion_moved_s"] for r in rows], "o-", color=color,
                    label=f"{name.upper()} door (p50 {result['summary'][name]['p50_s']:.1f}s)")
    ax.axhline(2.0, ls="--", color="grey", label="target 2 s")
    ax.set_xlabel("forget request")
    ax.set_ylabel("request -> champion moved (s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("time until the registry's champion honours a deletion", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged MiniLM)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--n-train", type=int, default=900)
    p.add_argument("--requests", type=int, default=5, help="forget requests per door (>= 5 for a p50)")
    p.add_argument("--ui", action="store_true", help="also measure the Dagster UI door (starts `dagster dev`)")
    p.add_argument("--bulk", type=int, default=10_000, help="ids in the bulk request")
    p.add_argument("--bulk-n-train", type=int, default=12_000, help="training examples of the bulk ledger")
    p.add_argument("--singles", type=int, default=20, help="single-id requests for the comparison")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.requests, args.bulk, args.bulk_n_train, args.singles = 60, 2, 50, 200, 3
        args.shards, args.slices = 2, 2
    if args.requests < 1 or args.bulk < 1 or args.bulk >= args.bulk_n_train:
        p.error("--requests and --bulk must be >= 1, and --bulk below --bulk-n-train")
    apply_threads(args)
    out = Path(args.out)
    root = fresh_dir(out / f"state-{NAME}")
    result = {"benchmark": NAME, "args": vars(args), "machine": machine()}
    engine = _state(args, root / "state")
    victims = _victims(engine, 2 * args.requests)
    result["cli"] = cli_door(args, engine.root, victims[: args.requests])
    if args.ui:
        result["ui"] = ui_door(args, engine.root, victims[args.requests:], root / "dagster_home")
    result["bulk"] = bulk(args, root)
    result["summary"] = {name: {"p50_s": float(np.median([r["champion_moved_s"] for r in result[name]])),
                                "max_s": float(max(r["champion_moved_s"] for r in result[name])), "n": len(result[name])}
                         for name in ("cli", "ui") if result.get(name)}
    if result.get("cli"):
        for k in ("honour_s", "publish_s", "erase_s"):
            result["summary"]["cli"][f"{k}_p50"] = float(np.median([r[k] for r in result["cli"]]))
    if result.get("ui"):
        for k in ("until_run_start_s", "run_start_to_champion_s", "run_s"):
            result["summary"]["ui"][f"{k}_p50"] = float(np.median([r[k] for r in result["ui"]]))
        splits = [r["split"] for r in result["ui"] if r["split"]]
        for k in (splits[0] if splits else {}):
            result["summary"]["ui"][f"split_{k}_p50"] = float(np.median([sp[k] for sp in splits]))
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    shutil.rmtree(root, ignore_errors=True)
    if not args.quiet:
        print(json.dumps(result["summary"], indent=2))
        print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()

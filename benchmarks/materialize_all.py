""""Materialize all" in the Dagster UI against the same training through the CLI, on the demo config.

1. CLI: `s3t train` on a new state folder (ingest, trunk, every stage, serve, register), the training
   `s3t demo` does before its deletions. Wall time of the process.
2. Dagster: `dagster dev` on another new state folder with the same config; the backfill the UI's
   "Materialize all" button launches (every asset of the `s3t` location, all partitions) is submitted
   through GraphQL, and the wall time runs until the backfill completes. With single-run backfill
   policies, each partitioned asset trains all its partitions in one step, so torch and the backbone
   load a handful of times instead of once per partition.
Writes <out>/materialize_all.json and .png: both wall times, their ratio (target <= 1.3), the runs the
backfill made, and the engine's own training seconds in each.
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

from benchmarks.common import DagsterDev, base_parser, clean_env, fresh_dir, machine, plt, write_json

NAME = "materialize_all"
BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } ... on InvalidStepError { invalidStepKey }
  ... on InvalidOutputError { stepKey } ... on UnauthorizedError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
  ... on PartitionBackfill { status numCancelable runs { id status } } ... on PythonError { message } } }"""


def _env(**extra: str) -> dict[str, str]:
    return clean_env(**extra)


def _gql(port: int, query: str, variables: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    if "errors" in out:
        raise RuntimeError(out["errors"])
    return out["data"]


def cli(args, root: Path, cfg: dict) -> dict:
    flags = []
    for k, v in cfg.items():
        if v is not None and k not in ("lora_alpha",):
            flags += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.time()
    r = subprocess.run([str(Path(sys.executable).with_name("s3t")), "train", "--state", str(root / "cli"), "--quiet", *flags],
                       capture_output=True, text=True, env=_env(**({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})))
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return {"wall_s": time.time() - t0, "stdout": r.stdout.strip().splitlines()[-1]}


def dagster(args, root: Path, cfg: dict) -> dict:
    root = root.resolve()  # the servers' environment must not depend on their working directory
    (root / "cfg.json").write_text(json.dumps(cfg))
    env = _env(S3T_STATE=str(root / "dagster"), S3T_CONFIG=str(root / "cfg.json"),
               **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    L = cfg.get("slices") or 3
    keys = ["examples", "slice_data", *(f"stage_{k}" for k in range(1, L + 1)), "s3t_ensemble"]
    params = {"assetSelection": [{"path": [k]} for k in keys], "allPartitions": True, "tags": []}
    with DagsterDev(root / "dagster_home", env) as dev:
        t0 = time.time()
        while True:  # the code location may still be loading
            out = _gql(dev.port, BACKFILL, {"p": params})["launchPartitionBackfill"]
            if out["__typename"] == "LaunchBackfillSuccess":
                break
            if time.time() - t0 > 300:
                raise RuntimeError(f"backfill not launched: {out}")
            time.sleep(2)
        t_launch = time.time()
        status = {}
        while time.time() - t_launch < args.timeout:
            status = _gql(dev.port, STATUS, {"id": out["backfillId"]})["partitionBackfillOrError"]
            if status.get("status") in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
                break
            time.sleep(2)
        wall = time.time() - t_launch
    runs = status.get("runs") or []
    if status.get("status") not in ("COMPLETED", "COMPLETED_SUCCESS") or any(r["status"] != "SUCCESS" for r in runs):
        raise RuntimeError(f"the backfill did not succeed: {status}")
    return {"wall_s": wall, "runs": len(runs), "status": status.get("status")}


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged MiniLM)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the backfill")
    args = p.parse_args(argv)
    from s3t_ops.config import S3TConfig

    d = S3TConfig()
    cfg = {k: getattr(d, k) for k in ("shards", "slices", "budget", "epochs", "n_train", "n_val", "n_test")}
    if args.backbone:
        cfg["backbone"] = args.backbone
    if args.quick:
        cfg.update(shards=2, slices=2, budget=2, epochs=1, n_train=60, n_val=12, n_test=12, batch_size=8, max_tokens=16,
                   lora_rank=4, lora_alpha=8)
    out = Path(args.out)
    root = fresh_dir(out / f"state-{NAME}")
    result = {"benchmark": NAME, "args": vars(args), "config": cfg, "machine": machine()}
    result["cli"] = cli(args, root, {k: v for k, v in cfg.items()})
    result["dagster"] = dagster(args, root, cfg)
    result["ratio"] = result["dagster"]["wall_s"] / result["cli"]["wall_s"]
    result["target"] = {"target": '"Materialize all" <= 1.3x the CLI training wall time', "measured": result["ratio"],
                        "met": result["ratio"] <= 1.3}
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.5), dpi=120)
    vals = [result["cli"]["wall_s"], result["dagster"]["wall_s"]]
    ax.barh(["s3t train (CLI)", f'"Materialize all"\n({result["dagster"]["runs"]} runs)'], vals, color=["tab:blue", "tab:orange"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}s", va="center", fontsize=8)
    ax.set_xlabel("wall seconds (ingest, trunk, every stage, serve, register)")
    ax.set_title(f"the same training through two doors: ratio {result['ratio']:.2f} (target <= 1.3)", fontsize=9)
    fig.tight_layout()
    png = out / f"{NAME}.png"
    fig.savefig(png)
    pyplot.close(fig)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    shutil.rmtree(root, ignore_errors=True)
    if not args.quiet:
        print(f"CLI {result['cli']['wall_s']:.0f}s, Materialize all {result['dagster']['wall_s']:.0f}s "
              f"({result['dagster']['runs']} runs): ratio {result['ratio']:.2f}; wrote {path}")
    return result


if __name__ == "__main__":
    main()

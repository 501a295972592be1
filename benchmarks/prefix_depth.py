"""Prefix depth: what a shallow model is worth, S3T's stage prefix against SISA's slice fallback.

Why does S3T keep more shards alive than SISA under deletions (the deletion-rate analysis) without a
matching gain in accuracy (the headline's area ratio)? Because what survives differs. After a deletion
in its k+1-th slice, an S3T shard serves the first k *stages* of a sequence (groups above the k-th
trained, the lower ones still the frozen backbone), a SISA shard serves its checkpoint after k *slices*
(every group adapted, on less data). This measures both, with no deletion, on one ingest:
  - one shard's model at depth k = 1..L (mean over shards) and the m-shard ensemble with every shard
    at depth k;
  - the ensemble of the first n shards at full depth, n = 1..m (what a live shard adds).
"S3T" is its identity sequence (stage k trains group k on slices 1..k; = S3T with B = 1, the same
checkpoints as sequence 0 of B = L); "SISA" is classic SISA (one LoRA over every group, slice by
slice). Same data, backbone, token length, epochs and seeds as the headline benchmark. Accuracy on val
and test together (more examples, smaller error bars). Writes prefix_depth.json and prefix_depth.png.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (apply_threads, bar, base_parser, fresh_dir, machine, make_config, model_args, plt, prepare_engine,
                               val_test_labels, val_test_logits, write_json)

NAME = "prefix_depth"
SYSTEMS = {"s3t": ("stages", "S3T stage prefix (identity sequence)"), "sisa": ("full", "classic SISA slice fallback")}


def measure(system, depths: int, labels, quiet: bool, desc: str) -> dict:
    """Accuracy by depth (one shard, all shards) and by number of full-depth shards."""
    from s3t_ops.baselines.base import accuracy, aggregate

    out = {"by_depth": [], "by_live_shards": []}
    with bar(depths, desc, quiet, unit="depth") as pb:
        for k in range(1, depths + 1):
            logits = val_test_logits(system.at_depth(k))  # the last depth's logits serve the live-shard curve below
            shard_acc = [accuracy(lg.argmax(-1), labels) for lg in logits]
            out["by_depth"].append({"depth": k, "shard_acc": shard_acc, "mean_shard_acc": sum(shard_acc) / len(shard_acc),
                                    "ensemble_acc": accuracy(aggregate(logits, "mean"), labels)})
            pb.update()
    for n in range(1, len(logits) + 1):
        out["by_live_shards"].append({"shards": n, "ensemble_acc": accuracy(aggregate(logits[:n], "mean"), labels)})
    return out


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, (a, b) = pyplot.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = {"s3t": "tab:blue", "sisa": "tab:orange"}
    for key, (_, label) in SYSTEMS.items():
        rows = result["systems"][key]["by_depth"]
        ks = [r["depth"] for r in rows]
        a.plot(ks, [r["ensemble_acc"] for r in rows], "o-", color=colors[key], label=f"{label}: {result['shards']} shards")
        a.plot(ks, [r["mean_shard_acc"] for r in rows], "s--", color=colors[key], alpha=0.7, label=f"{label}: one shard (mean)")
        live = result["systems"][key]["by_live_shards"]
        b.plot([r["shards"] for r in live], [r["ensemble_acc"] for r in live], "o-", color=colors[key], label=label)
    a.set_xticks(range(1, result["slices"] + 1))
    a.set_xlabel("depth served (S3T: stages of the sequence; SISA: slices in the checkpoint)")
    a.set_ylabel("accuracy (val + test)")
    a.set_title(f"what a prefix is worth ({result['n_train']} training tweets)", fontsize=9)
    a.legend(fontsize=7)
    b.set_xticks(range(1, result["shards"] + 1))
    b.set_xlabel("live shards, each at full depth")
    b.set_ylabel("ensemble accuracy (val + test)")
    b.set_title("what a live shard adds", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from s3t_ops.baselines import SISA, SharedData

    p = base_parser(NAME, __doc__)
    model_args(p, shards=5, slices=3, budget=1, n_train=6000, n_val=1000, n_test=1000)
    args = p.parse_args(argv)
    apply_threads(args)
    out = Path(args.out)
    root = fresh_dir(out / f"state-{NAME}")
    t0 = time.perf_counter()
    try:
        engine, prep = prepare_engine(make_config(args, root / "state"), args.source, progress=not args.quiet)
        data = SharedData.from_engine(engine)
        labels = val_test_labels(data)
        result = {"benchmark": NAME, "args": vars(args), "machine": machine(), "n_train": len(data.cells), "n_eval": len(labels),
                  "shards": data.shards, "slices": data.slices, "prepare_seconds": prep, "systems": {}}
        for key, (model, label) in SYSTEMS.items():
            system = SISA(data, model=model, retrain=False, name=label)
            with bar(None, f"fit {key}", args.quiet, unit="ex") as pb:
                system.on_batch = pb.update
                fit = system.fit()
                system.on_batch = None
            result["systems"][key] = {"label": label, "fit_seconds": fit.seconds, "grad_example_steps": fit.grad_example_steps,
                                      **measure(system, data.slices, labels, args.quiet, f"evaluate {key}")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s3t, sisa = result["systems"]["s3t"], result["systems"]["sisa"]
    result["s3t_minus_sisa_by_depth"] = [{"depth": x["depth"], "one_shard": (x["mean_shard_acc"] - y["mean_shard_acc"]) * 100,
                                          "ensemble": (x["ensemble_acc"] - y["ensemble_acc"]) * 100}
                                         for x, y in zip(s3t["by_depth"], sisa["by_depth"])]
    result["seconds"] = time.perf_counter() - t0
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    write_json(out, NAME, result)
    if not args.quiet:
        for key in SYSTEMS:
            rows = result["systems"][key]["by_depth"]
            print(f"{key}: one shard by depth " + " ".join(f"{r['mean_shard_acc']:.4f}" for r in rows) +
                  "; all shards by depth " + " ".join(f"{r['ensemble_acc']:.4f}" for r in rows) +
                  "; by live shards " + " ".join(f"{r['ensemble_acc']:.4f}" for r in result["systems"][key]["by_live_shards"]))
        print(f"wrote {out / (NAME + '.json')} and {png}")
    return result


if __name__ == "__main__":
    main()

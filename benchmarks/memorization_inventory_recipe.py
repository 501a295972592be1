"""Does the S3T-inventory memorization estimate track the true score when S3T trains like the monolithic model?

memorization_report.py scores the inventory of an S3T state trained with the S3T defaults (2 epochs at
1e-3 per stage); the true score is defined by the monolithic recipe (6 epochs at 3e-3). This trains a
second S3T state on the same tweets (same seed, so the same examples and shards) with --epochs/--lr,
recomputes the inventory estimate and its Spearman correlation with the true score saved by the
report (<out>/memorization_report_scores.csv). Writes <out>/memorization_inventory_recipe.json.

    .venv/bin/python benchmarks/memorization_inventory_recipe.py --out results/memorization
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/memorization")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pandas as pd

    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.memorization.scores import inventory_scores, rank_correlation

    out = Path(args.out)
    report = json.loads((out / "memorization_report.json").read_text())
    table = pd.read_csv(out / "memorization_report_scores.csv", index_col="id")
    base = S3T.open(report["state"], progress=False).cfg
    state = out / f"state-e{args.epochs}-lr{args.lr:g}"
    t0 = time.perf_counter()
    if (state / "config.json").is_file():
        engine = S3T.open(state, progress=False)
    else:
        cfg = S3TConfig.from_dict({**base.to_dict(), "epochs": args.epochs, "lr": args.lr, "state_dir": str(state)})
        engine = S3T.create(cfg, None, progress=False, publisher=Publisher())
        engine.fit()
    train_s = time.perf_counter() - t0
    t, c = time.perf_counter(), time.process_time()
    inv = inventory_scores(engine)
    inv_s, inv_cpu = time.perf_counter() - t, time.process_time() - c
    same_data = sorted(inv.index) == sorted(table.index)
    result = {
        "approximate": True, "state": str(state), "epochs": args.epochs, "lr": args.lr, "same_training_ids": same_data,
        "s3t_training_seconds": train_s, "test_accuracy": engine.evaluate("test"),
        "inventory_seconds": inv_s, "inventory_cpu_seconds": inv_cpu,
        "spearman_vs_truth": rank_correlation(inv["memorization"], table["memorization"]),
        "spearman_vs_confidence_proxy": rank_correlation(inv["memorization"], -table["confidence"]),
        "default_recipe": {"epochs": base.epochs, "lr": base.lr,
                           "spearman_vs_truth": rank_correlation(table["inventory"], table["memorization"]),
                           "spearman_vs_confidence_proxy": rank_correlation(table["inventory"], -table["confidence"])},
        "truth_cpu_seconds": report["truth"]["cpu_seconds"],
    }
    result["time_ratio"] = inv_cpu / result["truth_cpu_seconds"]
    (out / "memorization_inventory_recipe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run every benchmark in turn (same --out), then write <out>/summary.json with each one's targets.

Extra flags after `--` are not supported on purpose: run a single benchmark to change its sizes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import accuracy_zero, deletion_rate, deletion_workload, serving, training
from benchmarks.common import machine, write_json

BENCHMARKS = {"deletion_rate": deletion_rate, "deletion_workload": deletion_workload, "accuracy_zero": accuracy_zero,
              "training": training, "serving": serving}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results", help="results folder shared by every benchmark")
    p.add_argument("--quick", action="store_true", help="tiny sizes for every benchmark (smoke test)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS), help="benchmarks to run, in this order")
    p.add_argument("--source", default=None, help="data file passed to the benchmarks that train (default: the packaged tweets)")
    p.add_argument("--backbone", default=None, help="model folder passed to the benchmarks that use one (default: packaged MiniLM)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every benchmark (default: torch's choice)")
    args = p.parse_args(argv)
    common = ["--out", args.out] + (["--threads", str(args.threads)] if args.threads else []) + (["--quick"] if args.quick else []) + (["--quiet"] if args.quiet else [])
    model = (["--source", args.source] if args.source else []) + (["--backbone", args.backbone] if args.backbone else [])
    summary = {"machine": machine(), "benchmarks": {}}
    for name in args.only:
        t0 = time.perf_counter()
        res = BENCHMARKS[name].main(common + (model if name != "deletion_rate" else []))
        summary["benchmarks"][name] = {"seconds": time.perf_counter() - t0, "targets": res.get("targets", []), "json": str(Path(args.out) / f"{name}.json")}
    path = write_json(Path(args.out), "summary", summary)
    if not args.quiet:
        for name, s in summary["benchmarks"].items():
            for t in s["targets"]:
                print(f"[{name}] {t['target']}: {t['measured']} -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()

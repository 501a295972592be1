"""Headline: S3T against SISA at a size users deploy, with intervals over seeds.

Per seed (a different split, partition and initialisation), on the packaged tweets with the same
data, backbone, token length and epoch budget for every system:
  s3t        S3T, m shards x L slices, B = L cyclic sequences (deletion honoured by the serving plan)
  s3t_b1     S3T with B = 1: the first (identity) sequence of the same checkpoints, nothing retrained
  sisa       classic SISA (one LoRA over every group, slice checkpoints), prefix fallback, no retraining
  per_shard  m independent LoRA models, a hit shard drops out (no retraining)
  one_model  one LoRA model on all training data (the reference at 0 deletions)
Workload (a), every seed: uniform single deletions, the same sequence for every system, no retraining,
until SISA's prefix fallback is dead (every shard lost its first slice). Accuracy on the test split after
each request; the area is the mean accuracy over the requests (nothing served counts 0).
Workload (b), the first seed: a stream of --per-day deletions a day for --days days; S3T and SISA honour
them at once (serving plan / prefix fallback, 0 gradient steps) and retrain nightly (S3T: the stale stages
only; SISA: each hit shard from its fallback checkpoint). Accuracy after every request and every night,
served depth, gradient example-steps and seconds per day.

Resumable: <out>/headline.json keeps every finished (seed, system) and the stream's finished days; S3T's
state folders persist under <out>/state-headline, so a rerun continues where it stopped. Differences are
reported as mean and 95% t-interval over seeds (accuracy points). Writes headline.json and headline.png.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import QUICK, apply_threads, bar, base_parser, machine, plt, write_json

NAME = "headline"
SYSTEMS = ("s3t", "s3t_b1", "sisa", "per_shard", "one_model")
LABELS = {"s3t": "S3T (B = L)", "s3t_b1": "S3T (B = 1)", "sisa": "SISA (prefix fallback)", "per_shard": "per-shard LoRA",
          "one_model": "one model on all data", "sisa_nightly": "SISA (nightly retraining)", "s3t_nightly": "S3T (nightly retraining)"}
COLORS = {"s3t": "tab:blue", "s3t_b1": "tab:cyan", "sisa": "tab:orange", "per_shard": "tab:green", "one_model": "tab:purple"}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval (None for one value)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "ci95": None, "n": 0, "values": values}
    mean = float(np.mean(v))
    if len(v) < 2:
        return {"mean": mean, "ci95": None, "n": len(v), "values": values}
    half = T975.get(len(v) - 1, 1.96) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(v), "values": values}


def area(accs: list[float | None]) -> float:
    y = [0.0 if a is None or not math.isfinite(a) else a for a in accs]
    return float(np.mean(y))


def sisa_death(victims: list[str], cells: dict, shards: int) -> int:
    """Requests until classic SISA's prefix fallback is dead: every shard lost its first slice (slice 0)."""
    hit = set()
    for d, v in enumerate(victims, 1):
        s, j = cells[v]
        if j == 0:
            hit.add(s)
        if len(hit) == shards:
            return d
    return len(victims)


class Run:
    """One seed: the ingested state, the shared data view and the systems (fitted lazily, resumably)."""

    def __init__(self, args, seed: int, root: Path):
        from s3t_ops.baselines import SharedData
        from s3t_ops.engine import S3T
        from s3t_ops.publish import Publisher

        self.args, self.seed = args, seed
        cfg = config(args, root / f"seed{seed}", seed)
        if (cfg.state_dir / "config.json").is_file():
            self.engine = S3T.open(cfg.state_dir, progress=not args.quiet, publisher=Publisher())
        else:
            self.engine = S3T.create(cfg, args.source, progress=not args.quiet, publisher=Publisher())
        self.engine.build_trunk()
        self.data = SharedData.from_engine(self.engine)
        rng = random.Random(f"victims|{seed}")
        self.victims = rng.sample(sorted(self.data.cells), len(self.data.cells))
        self.D = min(args.max_deletions, sisa_death(self.victims, self.data.cells, cfg.shards))


def config(args, state_dir: Path, seed: int):
    from s3t_ops.config import S3TConfig

    values = dict(shards=args.shards, slices=args.slices, budget=args.slices, n_train=args.n_train, n_val=args.n_val,
                  n_test=args.n_test, seed=seed, backbone=args.backbone, state_dir=state_dir)
    if args.epochs:
        values["epochs"] = args.epochs
    if args.quick:
        values.update({k: v for k, v in QUICK.items() if k in ("epochs", "batch_size", "max_tokens", "lora_rank")})
        values["lora_alpha"] = 2 * values["lora_rank"]
    return S3TConfig(**values)


def fit(system, quiet: bool, desc: str) -> dict:
    with bar(None, desc, quiet, unit="ex") as pb:
        if hasattr(system, "on_batch"):
            system.on_batch = pb.update
        try:
            return system.fit().to_dict()
        finally:
            if hasattr(system, "on_batch"):
                system.on_batch = None


def curve(system, victims: list[str], forget: bool, quiet: bool, desc: str, follow=None) -> list[dict]:
    """Accuracy after each request; `follow` = a system honouring the requests for a view that only reads."""
    rows = [{"d": 0, "accuracy": system.evaluate("test"), "depths": system.depths(), "grad_example_steps": 0}]
    with bar(len(victims), desc, quiet, unit="req") as pb:
        for d, v in enumerate(victims, 1):
            cost = (follow or system).forget([v]) if forget else None
            rows.append({"d": d, "accuracy": system.evaluate("test"), "depths": system.depths(),
                         "honour_s": cost.seconds if cost else None, "grad_example_steps": cost.grad_example_steps if cost else 0})
            pb.update()
    return rows


def run_seed(args, seed: int, root: Path, result: dict, save) -> None:
    """Every system of one seed (finished ones are skipped), then, for the first seed, the stream."""
    from s3t_ops.baselines import SISA, FullRetrain, PerShardLoRA, S3TSystem, S3TView

    run = Run(args, seed, root)
    rec = result["runs"].setdefault(str(seed), {"n_train": len(run.data.cells), "deletions": run.D, "systems": {}})
    systems = rec["systems"]
    victims = run.victims[: run.D]
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[seed {seed}] {m}", flush=True))
    if ({"s3t", "s3t_b1"} & set(args.systems)) - set(systems):
        s3t = S3TSystem(run.engine, 0, name=LABELS["s3t"])
        t = time.perf_counter()
        fitted = s3t.fit().to_dict()
        fitted["seconds_this_process"] = time.perf_counter() - t
        if seed == result["seeds"][0] and "stream" in args.workloads and not (root / "stream-s3t").exists():
            s3t.clone(root / "stream-s3t")  # the stream starts from the same fitted state
        b1 = S3TView(s3t, [0], LABELS["s3t_b1"])
        b1_rows = [{"d": 0, "accuracy": b1.evaluate("test"), "depths": b1.depths(), "grad_example_steps": 0}]
        s3t_rows = [{"d": 0, "accuracy": s3t.evaluate("test"), "depths": s3t.depths(), "grad_example_steps": 0}]
        with bar(len(victims), "S3T deletions", args.quiet, unit="req") as pb:
            for d, v in enumerate(victims, 1):
                cost = s3t.forget([v])
                s3t_rows.append({"d": d, "accuracy": s3t.evaluate("test"), "depths": s3t.depths(), "honour_s": cost.seconds,
                                 "grad_example_steps": cost.grad_example_steps})
                b1_rows.append({"d": d, "accuracy": b1.evaluate("test"), "depths": b1.depths(), "grad_example_steps": 0})
                pb.update()
        systems["s3t"] = {"fit": fitted, "curve": s3t_rows}
        systems["s3t_b1"] = {"fit": {"shared_with": "s3t"}, "curve": b1_rows}
        say(f"S3T: acc@0 {s3t_rows[0]['accuracy']:.4f} (B=1 {b1_rows[0]['accuracy']:.4f}), area {area([r['accuracy'] for r in s3t_rows]):.4f}")
        save()
    if "sisa" in args.systems and "sisa" not in systems:
        sisa = SISA(run.data, retrain=False, model="full", name=LABELS["sisa"])
        fitted = fit(sisa, args.quiet, "fit SISA (example-steps)")
        stream_sisa = sisa.clone(retrain=False) if seed == result["seeds"][0] and "stream" in args.workloads else None
        systems["sisa"] = {"fit": fitted, "curve": curve(sisa, victims, True, args.quiet, "SISA deletions")}
        say(f"SISA: acc@0 {systems['sisa']['curve'][0]['accuracy']:.4f}, area {area([r['accuracy'] for r in systems['sisa']['curve']]):.4f}")
        save()
        if stream_sisa is not None:
            run.stream_sisa = stream_sisa
    if "per_shard" in args.systems and "per_shard" not in systems:
        ps = PerShardLoRA(run.data, retrain=False, name=LABELS["per_shard"])
        fitted = fit(ps, args.quiet, "fit per-shard LoRA (example-steps)")
        systems["per_shard"] = {"fit": fitted, "curve": curve(ps, victims, True, args.quiet, "per-shard deletions")}
        save()
    if "one_model" in args.systems and "one_model" not in systems:
        one = FullRetrain(run.data, name=LABELS["one_model"])
        fitted = fit(one, args.quiet, "fit one model (example-steps)")
        systems["one_model"] = {"fit": fitted, "curve": [{"d": 0, "accuracy": one.evaluate("test"), "depths": {}}]}
        say(f"one model: acc@0 {systems['one_model']['curve'][0]['accuracy']:.4f}")
        save()
    if seed == result["seeds"][0] and "stream" in args.workloads:
        run_stream(args, run, root, result.setdefault("stream", {"days": []}), save, say)


def run_stream(args, run: "Run", root: Path, rec: dict, save, say) -> None:
    """Workload (b): requests by day, honoured at once; S3T and SISA retrain at night."""
    from s3t_ops.baselines import SISA, S3TSystem
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher

    if len(rec["days"]) >= args.days:
        return
    rng = random.Random(f"stream|{run.seed}")
    pool = [v for v in sorted(run.data.cells)]
    stream = rng.sample(pool, args.days * args.per_day)
    s3t_dir = root / "stream-s3t"
    if not s3t_dir.exists():
        raise RuntimeError("the stream's S3T state is missing; rerun with a fresh --out")
    s3t = S3TSystem(S3T.open(s3t_dir, backbone=run.engine.backbone, progress=not args.quiet, publisher=Publisher()), 0,
                    name=LABELS["s3t_nightly"])
    sisa = getattr(run, "stream_sisa", None)
    if sisa is None:  # a resumed process: refit SISA (deterministic) and replay the finished days
        sisa = SISA(run.data, retrain=False, model="full", name=LABELS["sisa_nightly"])
        fit(sisa, args.quiet, "fit SISA for the stream")
        for day in rec["days"]:
            for v in day["ids"]:
                sisa.forget([v])
            sisa.retrain_pending()
    if not rec["days"]:
        rec["start"] = {"s3t": s3t.evaluate("test"), "sisa": sisa.evaluate("test")}
    for day in range(len(rec["days"]), args.days):
        ids = stream[day * args.per_day:(day + 1) * args.per_day]
        row = {"day": day + 1, "ids": ids, "requests": []}
        for v in ids:
            c1, c2 = s3t.forget([v]), sisa.forget([v])
            row["requests"].append({"s3t": {"accuracy": s3t.evaluate("test"), "depths": s3t.depths(), "honour_s": c1.seconds,
                                            "grad_example_steps": c1.grad_example_steps},
                                    "sisa": {"accuracy": sisa.evaluate("test"), "depths": sisa.depths(), "honour_s": c2.seconds,
                                             "grad_example_steps": c2.grad_example_steps}})
        night = {}
        for key, system in (("s3t", s3t), ("sisa", sisa)):
            cost = system.retrain_pending()
            night[key] = {"accuracy": system.evaluate("test"), "depths": system.depths(), "seconds": cost.background_seconds,
                          "grad_example_steps": cost.background_grad_example_steps, "trained": cost.retrained}
        row["night"] = night
        rec["days"].append(row)
        say(f"stream day {day + 1}: end of day S3T {row['requests'][-1]['s3t']['accuracy']:.4f} / SISA "
            f"{row['requests'][-1]['sisa']['accuracy']:.4f}; night: S3T {night['s3t']['grad_example_steps']} ex-steps "
            f"{night['s3t']['seconds']:.0f}s, SISA {night['sisa']['grad_example_steps']} ex-steps {night['sisa']['seconds']:.0f}s")
        save()


def summarise(result: dict) -> None:
    seeds = [s for s in map(str, result["seeds"]) if s in result["runs"]]
    runs = result["runs"]

    def acc0(seed: str, key: str) -> float | None:
        sysd = runs[seed]["systems"].get(key)
        return sysd["curve"][0]["accuracy"] if sysd else None

    def diff(key: str) -> list[float]:
        return [(acc0(s, "s3t") - acc0(s, key)) * 100 for s in seeds if acc0(s, "s3t") is not None and acc0(s, key) is not None]

    out = {"s3t_minus_sisa_at_0": interval(diff("sisa")), "s3t_minus_one_model_at_0": interval(diff("one_model")),
           "s3t_b1_minus_sisa_at_0": interval([(acc0(s, "s3t_b1") - acc0(s, "sisa")) * 100 for s in seeds
                                               if acc0(s, "s3t_b1") is not None and acc0(s, "sisa") is not None])}
    ratios, ratios_b1, ceilings = [], [], []
    for s in seeds:
        sy = runs[s]["systems"]
        if "s3t" in sy and "sisa" in sy:
            a_sisa = area([r["accuracy"] for r in sy["sisa"]["curve"]])
            ratios.append(area([r["accuracy"] for r in sy["s3t"]["curve"]]) / a_sisa)
            ratios_b1.append(area([r["accuracy"] for r in sy["s3t_b1"]["curve"]]) / a_sisa)
            # the ratio S3T would reach if no deletion cost it any accuracy (its curve flat at its 0-deletion value)
            ceilings.append(sy["s3t"]["curve"][0]["accuracy"] / a_sisa)
    out["area_ratio_vs_sisa"] = interval(ratios)
    out["area_ratio_b1_vs_sisa"] = interval(ratios_b1)
    out["area_ratio_ceiling_vs_sisa"] = interval(ceilings)
    out["accuracy_at_0"] = {k: interval([acc0(s, k) for s in seeds if acc0(s, k) is not None]) for k in SYSTEMS}
    out["area"] = {k: interval([area([r["accuracy"] for r in runs[s]["systems"][k]["curve"]]) for s in seeds
                                if k in runs[s]["systems"] and k != "one_model"]) for k in SYSTEMS if k != "one_model"}
    stream = result.get("stream", {}).get("days", [])
    if stream:
        start = result["stream"]["start"]
        points = {k: [start[k]] for k in ("s3t", "sisa")}
        for day in stream:
            for r in day["requests"]:
                for k in points:
                    points[k].append(r[k]["accuracy"])
            for k in points:
                points[k].append(day["night"][k]["accuracy"])
        out["stream_mean_acc"] = {k: float(np.mean(v)) for k, v in points.items()}
        out["stream_request_path_grad_example_steps"] = {k: int(sum(r[k]["grad_example_steps"] for d in stream for r in d["requests"]))
                                                          for k in ("s3t", "sisa")}
        out["stream_night_grad_example_steps"] = {k: int(sum(d["night"][k]["grad_example_steps"] for d in stream)) for k in ("s3t", "sisa")}
        out["stream_night_seconds"] = {k: float(sum(d["night"][k]["seconds"] for d in stream)) for k in ("s3t", "sisa")}
        out["stream_days"] = len(stream)
    result["n_train"] = runs[seeds[0]]["n_train"] if seeds else None
    result.update(out)
    m = lambda x: None if x is None else x["mean"]  # noqa: E731
    result["targets"] = [
        {"target": "0 deletions: S3T - classic SISA >= -0.5 points (mean over seeds)", "measured": m(out["s3t_minus_sisa_at_0"]),
         "met": None if m(out["s3t_minus_sisa_at_0"]) is None else m(out["s3t_minus_sisa_at_0"]) >= -0.5},
        {"target": "0 deletions: S3T within 3 points of one model on all data", "measured": m(out["s3t_minus_one_model_at_0"]),
         "met": None if m(out["s3t_minus_one_model_at_0"]) is None else m(out["s3t_minus_one_model_at_0"]) >= -3.0},
        {"target": "uniform deletions without retraining: area >= 1.15x SISA's", "measured": m(out["area_ratio_vs_sisa"]),
         "met": None if m(out["area_ratio_vs_sisa"]) is None else m(out["area_ratio_vs_sisa"]) >= 1.15},
    ]
    if "stream_mean_acc" in out:
        sm = out["stream_mean_acc"]
        result["targets"].append({"target": "stream with nightly retraining: S3T mean served accuracy >= SISA's, 0 gradient steps on the request path",
                                  "measured": sm["s3t"] - sm["sisa"],
                                  "met": sm["s3t"] >= sm["sisa"] and out["stream_request_path_grad_example_steps"]["s3t"] == 0})


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.6), dpi=120)
    ax = axes[0]
    every = {key: [result["runs"][s]["systems"][key]["curve"] for s in map(str, result["seeds"])
                   if s in result["runs"] and key in result["runs"][s]["systems"]] for key in ("s3t", "s3t_b1", "sisa", "per_shard")}
    shown = [len(c) for curves in every.values() for c in curves]
    for key, curves in every.items():
        if not curves:
            continue
        n = min(shown)  # one x range for every system: the shortest workload (the seed where SISA died first)
        ys = np.array([[0.0 if r["accuracy"] is None else r["accuracy"] for r in c[:n]] for c in curves])
        ax.plot(range(n), ys.mean(0), color=COLORS[key], label=LABELS[key])
        if len(curves) > 1:
            ax.fill_between(range(n), ys.min(0), ys.max(0), color=COLORS[key], alpha=0.15)
    one = result.get("accuracy_at_0", {}).get("one_model", {}).get("mean")
    if one:
        ax.axhline(one, ls="--", color=COLORS["one_model"], label=LABELS["one_model"])
    ax.set_xlabel("uniform deletion requests (no retraining)")
    ax.set_ylabel("test accuracy (mean over seeds; band: min-max)")
    ax.set_title("(a) accuracy while honouring deletions", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    keys = [k for k in SYSTEMS if result.get("accuracy_at_0", {}).get(k, {}).get("mean") is not None]
    means = [result["accuracy_at_0"][k]["mean"] for k in keys]
    errs = [(result["accuracy_at_0"][k]["mean"] - result["accuracy_at_0"][k]["ci95"][0]) if result["accuracy_at_0"][k]["ci95"] else 0
            for k in keys]
    ax.bar(range(len(keys)), means, yerr=errs, color=[COLORS[k] for k in keys], capsize=3)
    for i, v in enumerate(means):
        ax.text(i, v + 0.003, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=20, ha="right", fontsize=8)
    if means:
        ax.set_ylim(min(means) - 0.06, max(means) + 0.04)
    ax.set_title("accuracy at 0 deletions (95% interval over seeds)", fontsize=9)
    ax = axes[2]
    stream = result.get("stream", {}).get("days", [])
    if stream:
        for key, color in (("s3t", COLORS["s3t"]), ("sisa", COLORS["sisa"])):
            xs, ys = [0.0], [result["stream"]["start"][key]]
            for day in stream:
                per = len(day["requests"])
                for i, r in enumerate(day["requests"], 1):
                    xs.append(day["day"] - 1 + i / (per + 1))
                    ys.append(r[key]["accuracy"])
                xs.append(day["day"])
                ys.append(day["night"][key]["accuracy"])
            ax.plot(xs, ys, "o-", ms=3, color=color, label=LABELS[f"{key}_nightly"])
        ax.set_xlabel("day (requests honoured at once; retraining at each night, integer x)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    ax.set_title("(b) a stream of deletions with nightly retraining", fontsize=9)
    fig.suptitle(f"S3T vs SISA on {result.get('n_train')} training tweets, m={result['args']['shards']}, L={result['args']['slices']}, "
                 f"seeds {result['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def validate(p, args) -> None:
    from s3t_ops.data import load_packaged_tweets

    if not args.seeds or any(s < 0 for s in args.seeds):
        p.error("--seeds: give one or more non-negative seeds")
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if "s3t_b1" in args.systems and "s3t" not in args.systems:
        p.error("s3t_b1 reuses s3t's checkpoints: list s3t too")
    for name in ("n_train", "n_val", "n_test", "shards", "slices", "days", "per_day", "max_deletions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.shards * args.slices > args.n_train:
        p.error(f"m*L = {args.shards}*{args.slices} slices need at least as many training examples; --n-train is {args.n_train}")
    if args.source is None:
        available = len(load_packaged_tweets())
        if args.n_train + args.n_val + args.n_test > available:
            p.error(f"--n-train + --n-val + --n-test = {args.n_train + args.n_val + args.n_test} exceeds the "
                    f"{available} packaged tweets")
    if "stream" in args.workloads and not {"s3t", "sisa"} <= set(args.systems):
        p.error("the stream workload needs the s3t and sisa systems")


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    g = p.add_argument_group("data and model (the engine's defaults otherwise)")
    g.add_argument("--source", default=None, help="CSV/Parquet with text,label columns (default: the packaged tweets)")
    g.add_argument("--backbone", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--shards", type=int, default=5)
    g.add_argument("--slices", type=int, default=3, help="L; S3T trains B = L cyclic sequences")
    g.add_argument("--n-train", type=int, default=6000)
    g.add_argument("--n-val", type=int, default=1000)
    g.add_argument("--n-test", type=int, default=1000)
    g.add_argument("--epochs", type=int, default=None, help="epochs per stage / slice step / model (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), help=f"from {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", nargs="+", default=["uniform", "stream"], choices=["uniform", "stream"])
    p.add_argument("--max-deletions", type=int, default=200, help="cap on workload (a) (it stops when SISA's fallback is dead)")
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--per-day", type=int, default=3)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.seeds = 48, 12, 24, args.seeds[:2]
        args.shards, args.slices, args.days, args.per_day, args.max_deletions = 2, 2, 2, 2, 6
    validate(p, args)
    apply_threads(args)
    out = Path(args.out)
    path = out / f"{NAME}.json"
    root = out / f"state-{NAME}"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
        path.unlink(missing_ok=True)
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result and (result.get("args", {}).get("n_train"), result.get("args", {}).get("shards")) != (args.n_train, args.shards):
        p.error(f"{path} holds a run with other sizes; use --fresh or another --out")
    # seeds accumulate: a run of one seed (e.g. the stream alone) must not drop the others from the summary
    seeds = list(result.get("seeds", [])) + [s for s in args.seeds if s not in result.get("seeds", [])]
    result.update({"benchmark": NAME, "args": vars(args), "seeds": seeds})
    result.setdefault("runs", {})
    result.setdefault("machines", []).append(machine())
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save() -> None:
        summarise(result)
        result["seconds_this_process"] = time.perf_counter() - t0
        write_json(out, NAME, result)

    for seed in args.seeds:
        run_seed(args, seed, root, result, save)
    save()
    png = out / f"{NAME}.png"
    plot(result, png)
    result["png"] = str(png)
    write_json(out, NAME, result)
    if not args.quiet:
        for t in result["targets"]:
            print(f"target: {t['target']}: measured {t['measured']} -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()

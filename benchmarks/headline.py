"""Headline: S3T against SISA at a size users deploy, with intervals over seeds, both comparisons.

Per seed (a different split, partition and initialisation), on the packaged tweets, with the same data,
backbone, token length and epochs for every system:
  s3t        S3T with layered stages (stage k adapts the top k groups), B = L cyclic sequences
  s3t_b1     its identity sequence alone: the baseline the S3T paper calls "SISA" (its public code)
  s3t_full   S3T with full-depth sequence checkpoints (every stage adapts every group, warm-started from the
             stage before), B = L cyclic sequences; with B = 1 it would be classic SISA
  sisa       classic SISA: one full-depth LoRA per shard trained slice by slice, prefix fallback
  sisa_eq    SISA with B seeded replicas per shard, logits averaged over all m x B models: the same training
             compute as S3T's B sequences (the equal-compute control; replica 0 is `sisa` itself)
  one_model  one LoRA model on all training data (the reference at 0 deletions)

Workloads (nothing retrains in (a) and (c)):
(a) uniform: single deletions of uniformly drawn training examples, the same order for every system, until
    the LAST system serves nothing (the loop of the S3T paper's code). Per system: accuracy after every request
    (nothing served = 0), its deletion capacity (requests until it serves nothing, the killing one counted; the
    closed forms predict 49.8 for S3T and 34.3 for SISA at m = 5, L = 3, B = 3), and its lifetime area (mean
    accuracy over requests 0..the last death, the same range for every system).
(b) stream (--stream-seeds): --per-day requests a day for --days days, honoured at once (serving plan / prefix
    fallback, 0 gradient steps); each night SISA retrains every hit shard from its fallback, and each S3T
    variant of --stream-systems retrains within the SAME example-steps SISA just spent (equal nightly compute;
    chains in the retraining policy's budget order: every shard's cheapest first, shards serving least first; s3t_ops/policy.py).
(c) skewed (--skewed-seeds): requests drawn with a per-slice deletion prior (--prior; slice j of any shard gets
    a request with probability p_j), until the last system dies: S3T with BMS sequences for that prior (where
    BMS picks the same set as cyclic rotations, which it does for B = L = 3, the cyclic state is reused), SISA
    in index order, and SISA with prior-aware placement (the least likely slices first).

Resumable: <out>/headline.json keeps every finished piece; S3T states and SISA checkpoints persist under
<out>/state-headline. Several processes can run different seeds into different --out folders; `--merge A B ...`
combines their headline.json files into --out. Differences are mean and 95% t-interval over seeds (points).
Writes headline.json and headline.png.
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
SYSTEMS = ("s3t", "s3t_b1", "s3t_full", "sisa", "sisa_eq", "one_model")
VARIANTS = ("s3t", "s3t_full")  # S3T variants competing for `best_variant`
STAGE_MODEL = {"s3t": "layered", "s3t_full": "full_depth"}
LABELS = {"s3t": "S3T, layered stages (B = L)", "s3t_b1": "S3T layered, B = 1 (the paper's 'SISA')",
          "s3t_full": "S3T, full-depth checkpoints (B = L)", "sisa": "classic SISA (prefix fallback)",
          "sisa_eq": "SISA, B replicas (equal compute)", "one_model": "one model on all data",
          "sisa_prior": "SISA, prior-aware order", "s3t_full_bms": "S3T full-depth, BMS"}
COLORS = {"s3t": "tab:blue", "s3t_b1": "tab:cyan", "s3t_full": "tab:red", "sisa": "tab:orange", "sisa_eq": "tab:brown",
          "one_model": "tab:purple", "sisa_prior": "tab:olive", "s3t_full_bms": "tab:pink"}
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


def accs(curve: list[dict], upto: int | None = None) -> list[float]:
    """Accuracy after requests 0..upto (nothing served, or past the system's death, counts 0)."""
    y = [0.0 if r["accuracy"] is None or not math.isfinite(r["accuracy"]) else r["accuracy"] for r in curve]
    if upto is not None:
        y = (y + [0.0] * (upto + 1))[: upto + 1]
    return y


def area(curve: list[dict], upto: int | None = None) -> float:
    return float(np.mean(accs(curve, upto)))


# ------------------------------------------------------------------------------------------- one seed

class Seed:
    """The ingested states of one seed, the shared data view, and the fitted systems (built lazily, resumably)."""

    def __init__(self, args, seed: int, root: Path, rec: dict, save):
        self.args, self.seed, self.root, self.rec, self.save = args, seed, root / f"seed{seed}", rec, save
        self.root.mkdir(parents=True, exist_ok=True)
        self.say = (lambda m: None) if args.quiet else (lambda m: print(f"[seed {seed}] {m}", flush=True))
        self._engines: dict[str, object] = {}
        self._data = None
        self._sisa = None

    # --- states and data ------------------------------------------------------------------
    def config(self, state_dir: Path, **changes):
        from s3t_ops.config import S3TConfig

        a = self.args
        values = dict(shards=a.shards, slices=a.slices, budget=a.slices, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test,
                      seed=self.seed, backbone=a.backbone, state_dir=state_dir, trunk_dtype=a.trunk_dtype)
        if a.epochs:
            values["epochs"] = a.epochs
        if a.quick:
            values.update({k: v for k, v in QUICK.items() if k in ("epochs", "batch_size", "max_tokens", "lora_rank")})
            values["lora_alpha"] = 2 * values["lora_rank"]
        values.update(changes)
        return S3TConfig(**values)

    def engine(self, name: str, **changes):
        """The S3T state `name` of this seed (created and its trunk cached on first use). Each state loads its own
        backbone: the stage model is part of the config the backbone is built with."""
        from s3t_ops.engine import S3T
        from s3t_ops.publish import Publisher

        if name not in self._engines:
            path = self.root / name
            if (path / "config.json").is_file():
                eng = S3T.open(path, progress=not self.args.quiet, publisher=Publisher())
            else:
                eng = S3T.create(self.config(path, **changes), self.args.source, progress=not self.args.quiet, publisher=Publisher())
            eng.build_trunk()
            self._engines[name] = eng
        return self._engines[name]

    def clone_state(self, src: str, dst: str) -> None:
        """A copy of a fitted S3T state, taken before the uniform workload deletes from it."""
        if not (self.root / dst).exists():
            tmp = self.root / f".{dst}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.root / src, tmp)
            tmp.rename(self.root / dst)

    @property
    def data(self):
        """The shared data view (ledger, trunk, labels) every baseline reads, and the request orders: from a state of the
        same data that nothing trains or deletes from (a resumed process must see the data the first one saw)."""
        from s3t_ops.baselines import SharedData

        if self._data is None:
            self._data = SharedData.from_engine(self.engine("data"))
        return self._data

    def victims(self, prior: tuple[float, ...] | None = None) -> list[str]:
        """Every training id in request order: uniform, or weighted by a per-slice prior (p_j spread over slice j's
        examples in every shard; ordered by Efraimidis-Spirakis keys), seeded per seed."""
        cells = self.data.cells
        ids = sorted(cells)
        if prior is None:
            return random.Random(f"victims|{self.seed}").sample(ids, len(ids))
        per_slice = {}
        for i in ids:
            per_slice[cells[i][1]] = per_slice.get(cells[i][1], 0) + 1
        rng = np.random.default_rng(1000 + self.seed)
        weights = np.array([prior[cells[i][1]] / per_slice[cells[i][1]] for i in ids])
        keys = rng.random(len(ids)) ** (1.0 / np.maximum(weights, 1e-300))
        return [ids[r] for r in np.argsort(-keys, kind="stable")]

    # --- fitted systems -------------------------------------------------------------------
    def s3t(self, variant: str, view: str | None = None):
        from s3t_ops.baselines import S3TSystem

        eng = self.engine(variant if view is None else view, stage_model=STAGE_MODEL[variant])
        return S3TSystem(eng, 0, name=LABELS[variant])

    def sisa_count(self) -> int | None:
        """How many SISA replicas this run fits: B when sisa_eq is asked for, else classic SISA alone (replica 0 has
        the same bytes either way, so workloads (b) and (c) never fit replicas nobody asked for)."""
        return None if "sisa_eq" in self.args.systems else 1

    def sisa_replicas(self, count: int | None = None):
        """SISA x B replicas, fitted once and kept on disk (replica 0 is classic SISA); a fresh copy per call,
        with the fit's cost: the whole and per replica. `count=1`: classic SISA alone (when sisa_eq is not asked
        for), the same bytes as replica 0 of the B."""
        import torch

        from s3t_ops.baselines import SISAReplicas

        count = count or self.args.slices
        path = self.root / ("sisa_eq.pt" if count == self.args.slices else f"sisa_x{count}.pt")
        system = SISAReplicas(self.data, count, name=LABELS["sisa_eq"])
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            for rep, kept in zip(system.replicas, saved["replicas"]):
                rep.ckpts, rep.depth = [list(c) for c in kept["ckpts"]], list(kept["depth"])
            return system, saved["fit"]
        per = []
        with bar(None, f"fit SISA x{count}", self.args.quiet, unit="ex") as pb:
            for rep in system.replicas:
                rep.on_batch = pb.update
                per.append(rep.fit().to_dict())
                rep.on_batch = None
        fit = {"seconds": sum(r["seconds"] for r in per), "grad_example_steps": sum(r["grad_example_steps"] for r in per),
               "models": sum(r["models"] for r in per), "per_replica": per}
        tmp = path.with_suffix(".tmp")
        torch.save({"replicas": [{"ckpts": r.ckpts, "depth": r.depth} for r in system.replicas], "fit": fit}, tmp)
        tmp.rename(path)
        return system, fit


def lifetime(system, victims: list[str], cap: int, quiet: bool, desc: str, followers: dict | None = None) -> dict:
    """Accuracy after each request until `system` serves nothing (or `cap` requests). `followers`: views that read
    the same engine (s3t_b1): recorded alongside, each with its own capacity. Returns {name: record}."""
    followers = followers or {}

    def row(sys_, d, cost=None):
        acc = sys_.evaluate("test")
        return {"d": d, "accuracy": None if math.isnan(acc) else acc, "depths": sys_.depths(),
                "grad_example_steps": 0 if cost is None else cost.grad_example_steps}

    out = {"main": {"curve": [row(system, 0)], "capacity": None}}
    out.update({k: {"curve": [row(v, 0)], "capacity": None} for k, v in followers.items()})
    with bar(cap, desc, quiet, unit="req") as pb:
        for d, v in enumerate(victims[:cap], 1):
            cost = system.forget([v])
            for key, sys_ in (("main", system), *followers.items()):
                rec = out[key]
                if rec["capacity"] is None:
                    rec["curve"].append(row(sys_, d, cost if key == "main" else None))
                    if rec["curve"][-1]["accuracy"] is None:
                        rec["capacity"] = d
            pb.update()
            if out["main"]["capacity"] is not None:
                break
    return out


def run_uniform(s: Seed) -> None:
    """Workload (a) for every system of --systems not finished yet."""
    from s3t_ops.baselines import FullRetrain

    args, systems = s.args, s.rec.setdefault("systems", {})
    victims = s.victims()
    s.rec["n_train"] = len(s.data.cells)
    for variant in VARIANTS:
        if variant not in args.systems or variant in systems:
            continue
        system = s.s3t(variant)
        t = time.perf_counter()
        rep = system.engine.fit()
        fit = {"seconds": rep.seconds, "grad_example_steps": rep.grad_example_steps, "models": len(rep.trained),
               "seconds_this_process": time.perf_counter() - t}
        for workload in ("stream", "skewed"):  # later workloads start from the fitted state
            s.clone_state(variant, f"{variant}-{workload}")
        followers = {}
        if variant == "s3t":
            from s3t_ops.baselines import S3TView

            followers["s3t_b1"] = S3TView(system, [0], LABELS["s3t_b1"])
        out = lifetime(system, victims, args.max_deletions, args.quiet, f"{variant} deletions", followers)
        systems[variant] = {"fit": fit, **out["main"]}
        for k in followers:
            systems[k] = {"fit": {"shared_with": variant}, **out[k]}
        s.say(f"{variant}: acc@0 {out['main']['curve'][0]['accuracy']:.4f}, capacity {out['main']['capacity']}")
        s.save()
    if {"sisa", "sisa_eq"} & set(args.systems) - set(systems):
        replicas, fit = s.sisa_replicas(s.sisa_count())
        if "sisa_eq" in args.systems and "sisa_eq" not in systems:
            out = lifetime(replicas.clone(), victims, args.max_deletions, args.quiet, "SISA x B deletions")
            systems["sisa_eq"] = {"fit": fit, **out["main"]}
        if "sisa" in args.systems and "sisa" not in systems:
            classic = replicas.replicas[0].clone(retrain=False, name=LABELS["sisa"])
            out = lifetime(classic, victims, args.max_deletions, args.quiet, "SISA deletions")
            shared = {"shared_with": "sisa_eq (its replica 0)"} if "sisa_eq" in args.systems else {}
            systems["sisa"] = {"fit": {**fit["per_replica"][0], **shared}, **out["main"]}
            s.say(f"SISA: acc@0 {systems['sisa']['curve'][0]['accuracy']:.4f}, capacity {systems['sisa']['capacity']}; "
                  f"x{args.slices}: acc@0 {systems.get('sisa_eq', {}).get('curve', [{}])[0].get('accuracy')}")
        s.save()
    if "one_model" in args.systems and "one_model" not in systems:
        one = FullRetrain(s.data, name=LABELS["one_model"])
        with bar(None, "fit one model", args.quiet, unit="ex") as pb:
            one.on_batch = pb.update
            fit = one.fit().to_dict()
            one.on_batch = None
        systems["one_model"] = {"fit": fit, "curve": [{"d": 0, "accuracy": one.evaluate("test"), "depths": {}}], "capacity": None}
        s.say(f"one model: acc@0 {systems['one_model']['curve'][0]['accuracy']:.4f}")
        s.save()


def run_stream(s: Seed) -> None:
    """Workload (b): requests by day, honoured at once; nightly retraining at SISA's example-steps for every system."""
    from s3t_ops.baselines import S3TSystem
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher

    args = s.args
    rec = s.rec.setdefault("stream", {"days": [], "systems": ["sisa", *args.stream_systems]})
    if len(rec["days"]) >= args.days:
        return
    ids = random.Random(f"stream|{s.seed}").sample(sorted(s.data.cells), args.days * args.per_day)
    systems = {}
    for v in rec["systems"][1:]:
        path = s.root / f"{v}-stream"
        if not path.exists():
            raise RuntimeError(f"{path} is missing: run the uniform workload of {v} first (it clones the fitted state)")
        systems[v] = S3TSystem(S3T.open(path, progress=not args.quiet, publisher=Publisher()), 0, name=LABELS[v])
    replicas, _ = s.sisa_replicas(s.sisa_count())
    sisa = replicas.replicas[0].clone(retrain=False, name=LABELS["sisa"])
    for day in rec["days"]:  # a resumed process: replay the finished days on SISA (deterministic)
        for v in day["ids"]:
            sisa.forget([v])
        sisa.retrain_pending()
    everyone = {"sisa": sisa, **systems}
    if not rec["days"]:
        rec["start"] = {k: sy.evaluate("test") for k, sy in everyone.items()}
    for day in range(len(rec["days"]), args.days):
        todays = ids[day * args.per_day:(day + 1) * args.per_day]
        row = {"day": day + 1, "ids": todays, "requests": []}
        for v in todays:
            req = {}
            for k, sy in everyone.items():
                cost = sy.forget([v])
                acc = sy.evaluate("test")
                req[k] = {"accuracy": None if math.isnan(acc) else acc, "depths": sy.depths(), "grad_example_steps": cost.grad_example_steps}
            row["requests"].append(req)
        night = {}
        cost = sisa.retrain_pending()
        night["sisa"] = {"seconds": cost.background_seconds, "grad_example_steps": cost.background_grad_example_steps,
                         "trained": cost.retrained}
        budget = cost.background_grad_example_steps
        for k, sy in systems.items():
            c = sy.retrain_pending(budget=budget, policy="all")
            night[k] = {"seconds": c.background_seconds, "grad_example_steps": c.background_grad_example_steps, "trained": c.retrained,
                        "budget": budget, "deferred_chains": len(sy.pending_costs())}
        for k, sy in everyone.items():
            acc = sy.evaluate("test")
            night[k].update({"accuracy": None if math.isnan(acc) else acc, "depths": sy.depths()})
        row["night"] = night
        rec["days"].append(row)
        s.say(f"stream day {day + 1}: " + "; ".join(f"{k} {night[k]['accuracy']:.4f} after {night[k]['grad_example_steps']} ex-steps"
                                                     for k in everyone))
        s.save()


def run_skewed(s: Seed) -> None:
    """Workload (c): a skewed per-slice deletion prior; S3T with BMS sequences, SISA with and without prior-aware placement."""
    from s3t_ops.baselines import S3TSystem
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.sequences import select_sequences

    args = s.args
    prior = tuple(args.prior)
    rec = s.rec.setdefault("skewed", {"prior": list(prior), "systems": {}})
    systems = rec["systems"]
    victims = s.victims(prior)
    bms = select_sequences("bms", args.slices, args.slices, prior)
    same = set(bms) == set(select_sequences("cyclic", args.slices, args.slices, None))
    rec["bms_sequences"] = [list(p) for p in bms]
    rec["bms_equals_cyclic_set"] = same
    if "s3t_full_bms" not in systems:
        if same:  # the same checkpoints (keys hash data and prefixes, not the sequence's index): reuse the fitted state
            eng = S3T.open(s.root / "s3t_full-skewed", progress=not args.quiet, publisher=Publisher())
            fit = {"shared_with": "s3t_full (BMS chose the cyclic rotations)"}
        else:
            eng = s.engine("s3t_full_bms", stage_model="full_depth", selection="bms", deletion_prior=prior)
            rep = eng.fit()
            fit = {"seconds": rep.seconds, "grad_example_steps": rep.grad_example_steps, "models": len(rep.trained)}
        out = lifetime(S3TSystem(eng, 0, name=LABELS["s3t_full_bms"]), victims, args.max_deletions, args.quiet, "S3T BMS (skewed)")
        systems["s3t_full_bms"] = {"fit": fit, **out["main"]}
        s.save()
    if "sisa" not in systems:
        replicas, _ = s.sisa_replicas(s.sisa_count())
        out = lifetime(replicas.replicas[0].clone(retrain=False), victims, args.max_deletions, args.quiet, "SISA (skewed)")
        systems["sisa"] = {"fit": {"shared_with": "sisa"}, **out["main"]}
        s.save()
    if "sisa_prior" not in systems:
        from s3t_ops.baselines import SISA

        order = tuple(sorted(range(args.slices), key=lambda j: (prior[j], j)))  # least likely first: they fall back least
        prior_sisa = SISA(s.data, retrain=False, model="full", order=order, name=LABELS["sisa_prior"])
        with bar(None, "fit SISA (prior-aware order)", args.quiet, unit="ex") as pb:
            prior_sisa.on_batch = pb.update
            fit = prior_sisa.fit().to_dict()
            prior_sisa.on_batch = None
        out = lifetime(prior_sisa, victims, args.max_deletions, args.quiet, "SISA prior-aware (skewed)")
        systems["sisa_prior"] = {"fit": {**fit, "order": list(order)}, **out["main"]}
        s.save()
    s.say("skewed: capacity " + ", ".join(f"{k} {v['capacity']}" for k, v in systems.items()))


# ------------------------------------------------------------------------------------------- summary

def _acc0(sy: dict) -> float | None:
    return sy["curve"][0]["accuracy"] if sy and sy.get("curve") else None


def seed_summary(rec: dict) -> dict:
    """Per seed: accuracy at 0, capacity and lifetime area of every system (the same range for all: until the last death)."""
    sy = rec.get("systems", {})
    curves = {k: v for k, v in sy.items() if k != "one_model" and v.get("curve")}
    last = max((len(v["curve"]) - 1 for v in curves.values()), default=0)
    out = {"lifetime_requests": last, "acc0": {k: _acc0(v) for k, v in sy.items()},
           "capacity": {k: v.get("capacity") for k, v in curves.items()},
           "area": {k: area(v["curve"], last) for k, v in curves.items()},
           "fit_grad_example_steps": {k: v["fit"].get("grad_example_steps") for k, v in sy.items() if "grad_example_steps" in v["fit"]},
           "fit_seconds": {k: v["fit"].get("seconds") for k, v in sy.items() if "seconds" in v["fit"]}}
    sk = rec.get("skewed", {}).get("systems", {})
    if sk:
        last_sk = max(len(v["curve"]) - 1 for v in sk.values())
        out["skewed"] = {"lifetime_requests": last_sk, "capacity": {k: v.get("capacity") for k, v in sk.items()},
                         "area": {k: area(v["curve"], last_sk) for k, v in sk.items()}, "acc0": {k: _acc0(v) for k, v in sk.items()}}
    st = rec.get("stream", {})
    if st.get("days"):
        points = {k: [st["start"][k]] for k in st["systems"]}
        for day in st["days"]:
            for r in day["requests"]:
                for k in points:
                    points[k].append(r[k]["accuracy"] or 0.0)
            for k in points:
                points[k].append(day["night"][k]["accuracy"] or 0.0)
        out["stream"] = {"days": len(st["days"]), "mean_acc": {k: float(np.mean(v)) for k, v in points.items()},
                         "night_steps": {k: int(sum(d["night"][k]["grad_example_steps"] for d in st["days"])) for k in points},
                         "night_seconds": {k: float(sum(d["night"][k]["seconds"] for d in st["days"])) for k in points},
                         "request_path_steps": {k: int(sum(r[k]["grad_example_steps"] for d in st["days"] for r in d["requests"]))
                                                for k in points}}
    return out


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def summarise(result: dict) -> None:
    seeds = [s for s in map(str, result["seeds"]) if s in result["runs"]]
    per = {s: seed_summary(result["runs"][s]) for s in seeds}
    result["per_seed"] = per

    def over(fn) -> dict:
        vals = [fn(per[s]) for s in seeds]
        return interval([v for v in vals if v is not None])

    def pts(a, b):
        return None if a is None or b is None else (a - b) * 100

    out = {"accuracy_at_0": {k: over(lambda p, k=k: p["acc0"].get(k)) for k in SYSTEMS},
           "capacity": {k: over(lambda p, k=k: p["capacity"].get(k)) for k in SYSTEMS if k != "one_model"},
           "lifetime_area": {k: over(lambda p, k=k: p["area"].get(k)) for k in SYSTEMS if k != "one_model"},
           "fit_grad_example_steps": {k: over(lambda p, k=k: p["fit_grad_example_steps"].get(k)) for k in SYSTEMS},
           "fit_seconds": {k: over(lambda p, k=k: p["fit_seconds"].get(k)) for k in SYSTEMS}}
    comparisons = {}
    for v in VARIANTS:
        comparisons[v] = {
            "minus_sisa_at_0": over(lambda p, v=v: pts(p["acc0"].get(v), p["acc0"].get("sisa"))),
            "minus_sisa_eq_at_0": over(lambda p, v=v: pts(p["acc0"].get(v), p["acc0"].get("sisa_eq"))),
            "minus_one_model_at_0": over(lambda p, v=v: pts(p["acc0"].get(v), p["acc0"].get("one_model"))),
            "capacity_ratio_vs_sisa": over(lambda p, v=v: ratio(p["capacity"].get(v), p["capacity"].get("sisa"))),
            "lifetime_area_ratio_vs_sisa": over(lambda p, v=v: ratio(p["area"].get(v), p["area"].get("sisa"))),
            "lifetime_area_ratio_vs_sisa_eq": over(lambda p, v=v: ratio(p["area"].get(v), p["area"].get("sisa_eq"))),
        }
    # the S3T paper's comparison: layered S3T against its own identity sequence
    comparisons["s3t"]["minus_paper_baseline_at_0"] = over(lambda p: pts(p["acc0"].get("s3t"), p["acc0"].get("s3t_b1")))
    comparisons["s3t"]["lifetime_area_ratio_vs_paper_baseline"] = over(lambda p: ratio(p["area"].get("s3t"), p["area"].get("s3t_b1")))
    comparisons["s3t"]["capacity_ratio_vs_paper_baseline"] = over(lambda p: ratio(p["capacity"].get("s3t"), p["capacity"].get("s3t_b1")))
    out["comparisons"] = comparisons
    ranked = [v for v in VARIANTS if comparisons[v]["lifetime_area_ratio_vs_sisa"]["mean"] is not None]
    best = max(ranked, key=lambda v: (comparisons[v]["lifetime_area_ratio_vs_sisa"]["mean"],
                                      comparisons[v]["minus_sisa_at_0"]["mean"] or -1e9), default=None)
    out["best_variant"] = best
    out["best_variant_rule"] = "the S3T variant with the highest mean lifetime area over classic SISA's (ties: accuracy at 0)"
    if best is not None:
        c = comparisons[best]
        out["best_minus_sisa_at_0"] = c["minus_sisa_at_0"]
        out["capacity_ratio_vs_sisa"] = c["capacity_ratio_vs_sisa"]
        out["lifetime_area_ratio_vs_sisa"] = c["lifetime_area_ratio_vs_sisa"]
    streams = [s for s in seeds if "stream" in per[s]]
    if streams:
        stream_variant = best if best in result["runs"][streams[0]]["stream"]["systems"] else result["runs"][streams[0]]["stream"]["systems"][-1]
        out["stream_variant"] = stream_variant
        vals = [(per[s]["stream"]["mean_acc"].get(stream_variant), per[s]["stream"]["mean_acc"]["sisa"]) for s in streams]
        out["stream_acc_minus_sisa"] = interval([pts(a, b) for a, b in vals if a is not None])
        out["stream_night_steps_ratio_vs_sisa"] = interval(
            [ratio(per[s]["stream"]["night_steps"].get(stream_variant), per[s]["stream"]["night_steps"]["sisa"]) for s in streams])
        out["stream_request_path_grad_example_steps"] = {k: sum(per[s]["stream"]["request_path_steps"].get(k, 0) for s in streams)
                                                          for k in ("sisa", stream_variant)}
        out["stream_days"] = {s: per[s]["stream"]["days"] for s in streams}
    skews = [s for s in seeds if "skewed" in per[s]]
    if skews:
        sk = {"prior": result["runs"][skews[0]]["skewed"]["prior"],
              "bms_equals_cyclic_set": result["runs"][skews[0]]["skewed"].get("bms_equals_cyclic_set")}
        for k in ("s3t_full_bms", "sisa", "sisa_prior"):
            sk[f"capacity_{k}"] = interval([per[s]["skewed"]["capacity"].get(k) for s in skews])
        for base in ("sisa", "sisa_prior"):
            sk[f"capacity_ratio_vs_{base}"] = interval([ratio(per[s]["skewed"]["capacity"].get("s3t_full_bms"),
                                                               per[s]["skewed"]["capacity"].get(base)) for s in skews])
            sk[f"lifetime_area_ratio_vs_{base}"] = interval([ratio(per[s]["skewed"]["area"].get("s3t_full_bms"),
                                                                   per[s]["skewed"]["area"].get(base)) for s in skews])
        out["skewed"] = sk
    result.update(out)
    m = lambda x: None if not x else x.get("mean")  # noqa: E731

    def target(name, value, ok):
        return {"target": name, "measured": value, "met": None if value is None else ok(value)}

    result["targets"] = [
        target("best S3T variant - classic SISA at 0 deletions >= -0.2 points", m(out.get("best_minus_sisa_at_0")), lambda v: v >= -0.2),
        target("deletion capacity >= 1.4x classic SISA's", m(out.get("capacity_ratio_vs_sisa")), lambda v: v >= 1.4),
        target("lifetime area >= 1.3x classic SISA's", m(out.get("lifetime_area_ratio_vs_sisa")), lambda v: v >= 1.3),
        target("stream: mean served accuracy >= SISA's (points)", m(out.get("stream_acc_minus_sisa")), lambda v: v >= 0),
        target("stream: nightly example-steps <= 1.0x SISA's", m(out.get("stream_night_steps_ratio_vs_sisa")), lambda v: v <= 1.0),
    ]


# ------------------------------------------------------------------------------------------- plot

def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 4, figsize=(21, 4.8), dpi=110)
    seeds = [s for s in map(str, result["seeds"]) if s in result["runs"]]
    ax = axes[0]
    for key in ("s3t_full", "s3t", "s3t_b1", "sisa", "sisa_eq"):
        curves = [result["runs"][s]["systems"][key]["curve"] for s in seeds if key in result["runs"][s].get("systems", {})]
        if not curves:
            continue
        n = max(result["per_seed"][s]["lifetime_requests"] for s in seeds) if seeds else 0
        ys = np.array([accs(c, n) for c in curves])
        ax.plot(range(n + 1), ys.mean(0), color=COLORS[key], label=f"{LABELS[key]} ({len(curves)} seeds)", lw=1.4)
        if len(curves) > 1:
            ax.fill_between(range(n + 1), ys.min(0), ys.max(0), color=COLORS[key], alpha=0.1)
    ax.set_xlabel("uniform deletion requests, no retraining (until the last system serves nothing)")
    ax.set_ylabel("test accuracy (nothing served = 0; mean over seeds)")
    ax.set_title("(a) accuracy over each system's lifetime", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for key in SYSTEMS:
        a = result.get("accuracy_at_0", {}).get(key, {})
        c = result.get("fit_grad_example_steps", {}).get(key, {})
        if a.get("mean") is None or c.get("mean") is None:
            continue
        err = (a["mean"] - a["ci95"][0]) if a.get("ci95") else 0
        ax.errorbar([c["mean"]], [a["mean"]], yerr=[err], fmt="o", color=COLORS[key], capsize=3, label=f"{LABELS[key]} ({a['n']} seeds)")
        ax.annotate(key, (c["mean"], a["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (gradient example-steps, log)")
    ax.set_ylabel("test accuracy at 0 deletions (95% interval)")
    ax.set_title("accuracy vs training compute", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[2]
    keys = [k for k in SYSTEMS if k != "one_model" and result.get("capacity", {}).get(k, {}).get("mean") is not None]
    vals = [result["capacity"][k]["mean"] for k in keys]
    ax.bar(range(len(keys)), vals, color=[COLORS[k] for k in keys])
    for i, v in enumerate(vals):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(keys)), [f"{k} ({result['capacity'][k]['n']})" for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("requests until nothing is served (mean over (n) seeds)")
    ax.set_title("deletion capacity (uniform requests)", fontsize=9)
    ax = axes[3]
    stream_seeds = [s for s in seeds if result["runs"][s].get("stream", {}).get("days")]
    if stream_seeds:
        st0 = result["runs"][stream_seeds[0]]["stream"]
        for key in st0["systems"]:
            series = []
            for s in stream_seeds:
                st = result["runs"][s]["stream"]
                xs, ys = [0.0], [st["start"][key]]
                for day in st["days"]:
                    per = len(day["requests"])
                    for i, r in enumerate(day["requests"], 1):
                        xs.append(day["day"] - 1 + i / (per + 1))
                        ys.append(r[key]["accuracy"] or 0.0)
                    xs.append(day["day"])
                    ys.append(day["night"][key]["accuracy"] or 0.0)
                series.append((xs, ys))
            n = min(len(x) for x, _ in series)
            ax.plot(series[0][0][:n], np.mean([y[:n] for _, y in series], 0), "o-", ms=3, color=COLORS.get(key, "k"),
                    label=LABELS.get(key, key) + (" (SISA's nightly example-steps)" if key != "sisa" else ""))
        ax.set_xlabel("day (requests honoured at once; nights retrain at equal example-steps)")
        ax.set_ylabel(f"test accuracy (mean over seeds {', '.join(stream_seeds)})")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_axis_off()
    ax.set_title("(b) a stream of deletions, equal nightly compute", fontsize=9)
    fig.suptitle(f"S3T vs SISA on {result.get('n_train')} training tweets, m={result['args']['shards']}, L={result['args']['slices']}, "
                 f"B={result['args']['slices']}, seeds {result['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


# ------------------------------------------------------------------------------------------- main

def validate(p, args) -> None:
    from s3t_ops.data import load_packaged_tweets

    if not args.seeds or any(s < 0 for s in args.seeds):
        p.error("--seeds: give one or more non-negative seeds")
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if "s3t_b1" in args.systems and "s3t" not in args.systems:
        p.error("s3t_b1 reuses s3t's checkpoints: list s3t too")
    bad = [v for v in args.stream_systems if v not in VARIANTS]
    if bad:
        p.error(f"--stream-systems: {', '.join(bad)} is not an S3T variant ({', '.join(VARIANTS)})")
    for name in ("n_train", "n_val", "n_test", "shards", "slices", "days", "per_day", "max_deletions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.shards * args.slices > args.n_train:
        p.error(f"m*L = {args.shards}*{args.slices} slices need at least as many training examples; --n-train is {args.n_train}")
    if len(args.prior) != args.slices or any(x < 0 for x in args.prior) or not math.isclose(sum(args.prior), 1.0, abs_tol=1e-6):
        p.error(f"--prior: give {args.slices} non-negative probabilities summing to 1 (one per slice)")
    if args.source is None and not args.merge:
        available = len(load_packaged_tweets())
        if args.n_train + args.n_val + args.n_test > available:
            p.error(f"--n-train + --n-val + --n-test = {args.n_train + args.n_val + args.n_test} exceeds the {available} packaged tweets")


def merge(sources: list[str]) -> dict:
    """One result from several processes' headline.json files (each seed from the file that holds the most of it).
    ValueError (the caller's one-line error) for a missing file or runs that must not be combined."""
    result: dict = {}
    for src in sources:
        path = Path(src) / f"{NAME}.json"
        if not path.is_file():
            raise ValueError(f"--merge: {path} does not exist")
        part = json.loads(path.read_text())
        if result and (part["args"]["n_train"], part["args"]["shards"]) != (result["args"]["n_train"], result["args"]["shards"]):
            raise ValueError(f"--merge: {path} holds a run with other sizes")
        if result and part.get("trunk_dtype", "float32") != result["trunk_dtype"]:
            raise ValueError(f"--merge: {path} holds a run with a {part.get('trunk_dtype', 'float32')} trunk cache, "
                             f"the others a {result['trunk_dtype']} one")
        if not result:
            result = {"benchmark": NAME, "args": part["args"], "trunk_dtype": part.get("trunk_dtype", "float32"), "seeds": [],
                      "runs": {}, "machines": [], "merged_from": []}
        result["merged_from"].append(str(path))
        result["machines"] += part.get("machines", [])
        for seed, rec in part["runs"].items():
            mine = result["runs"].get(seed)
            if mine is None or len(json.dumps(rec)) > len(json.dumps(mine)):
                result["runs"][seed] = rec
            if int(seed) not in result["seeds"]:
                result["seeds"].append(int(seed))
    result["seeds"].sort()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    g = p.add_argument_group("data and model (the engine's defaults otherwise)")
    g.add_argument("--source", default=None, help="CSV/Parquet with text,label columns (default: the packaged tweets)")
    g.add_argument("--backbone", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--shards", type=int, default=5)
    g.add_argument("--slices", type=int, default=3, help="L; S3T trains B = L sequences, SISA x B replicas")
    g.add_argument("--n-train", type=int, default=6000)
    g.add_argument("--n-val", type=int, default=1000)
    g.add_argument("--n-test", type=int, default=1000)
    g.add_argument("--epochs", type=int, default=None, help="epochs per stage / slice step / model (default: the config's)")
    g.add_argument("--trunk-dtype", default=None, choices=["float16", "float32"],
                   help="how the trunk cache stores hidden states (default: the config's); one result never mixes the two")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), help=f"from {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", nargs="+", default=["uniform", "stream", "skewed"], choices=["uniform", "stream", "skewed"])
    p.add_argument("--stream-seeds", type=int, nargs="+", default=[0, 1], help="seeds (among --seeds) that run the stream")
    p.add_argument("--stream-systems", nargs="+", default=["s3t_full"], help="S3T variants in the stream (beside SISA)")
    p.add_argument("--skewed-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (among --seeds) that run workload (c)")
    p.add_argument("--prior", type=float, nargs="+", default=[0.6, 0.3, 0.1], help="per-slice deletion prior of workload (c)")
    p.add_argument("--max-deletions", type=int, default=400, help="cap on workloads (a) and (c) (they stop when the last system dies)")
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--per-day", type=int, default=3)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="combine these folders' headline.json into --out (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_test = 48, 12, 24
        args.shards, args.slices, args.days, args.per_day, args.max_deletions = 2, 2, 2, 2, 60
        if len(args.prior) != 2:
            args.prior = [0.7, 0.3]
    validate(p, args)
    apply_threads(args)
    out = Path(args.out)
    path = out / f"{NAME}.json"
    if args.merge:
        try:
            result = merge(args.merge)
        except ValueError as e:
            p.error(str(e))  # before --out is created: a refused merge leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        root = out / f"state-{NAME}"
        if args.fresh:
            shutil.rmtree(root, ignore_errors=True)
            path.unlink(missing_ok=True)
        result = json.loads(path.read_text()) if path.is_file() else {}
        if result and (result.get("args", {}).get("n_train"), result.get("args", {}).get("shards")) != (args.n_train, args.shards):
            p.error(f"{path} holds a run with other sizes; use --fresh or another --out")
        from s3t_ops.config import S3TConfig

        dtype = args.trunk_dtype = args.trunk_dtype or S3TConfig().trunk_dtype  # never mix the two in one result
        if result and result.get("trunk_dtype", "float32") != dtype:
            p.error(f"{path} holds a run with a {result.get('trunk_dtype', 'float32')} trunk cache, this run's is {dtype}; "
                    f"pass --trunk-dtype {result.get('trunk_dtype', 'float32')}, --fresh or another --out")
        result["trunk_dtype"] = dtype
        seeds = list(result.get("seeds", [])) + [s for s in args.seeds if s not in result.get("seeds", [])]
        result.update({"benchmark": NAME, "args": vars(args), "seeds": seeds})
        result.setdefault("runs", {})
        result.setdefault("machines", []).append(machine())
        root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save() -> None:
        summarise(result)
        result["n_train"] = next((r.get("n_train") for r in result["runs"].values() if r.get("n_train")), None)
        result["seconds_this_process"] = time.perf_counter() - t0
        write_json(out, NAME, result)

    if not args.merge:
        for seed in args.seeds:
            s = Seed(args, seed, root, result["runs"].setdefault(str(seed), {}), save)
            if "uniform" in args.workloads:
                run_uniform(s)
            if "stream" in args.workloads and seed in args.stream_seeds:
                run_stream(s)
            if "skewed" in args.workloads and seed in args.skewed_seeds:
                run_skewed(s)
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

"""The state-folder doors of approximate unlearning: `s3t unlearn` and the Dagster memorization assets.

Everything here is APPROXIMATE unlearning of a monolithic model trained on an S3T state's live data:
the unlearned model's weights may still carry information about the forgotten examples, and it is
only scored against a model retrained without them (the oracle). The S3T state itself (ledger,
checkpoints, served ensemble) is never changed; `s3t forget` is the exact path.

Files under `<state>/memorization/`:
  original-<hash>/   the original model and its training-time proxies (cached per config and data)
  runs/<stamp>-<method>/report.json, report.png, model.safetensors   one `s3t unlearn` call
  scores/            the `memorization_scores` asset: scores.parquet + scores.json
  unlearned/         the `rum_unlearned` asset: model.safetensors + unlearned.json
  report/            the `unlearning_report` asset: report.json + report.png
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from s3t_ops.memorization import metrics, proxies, scores
from s3t_ops.memorization import workflow as wf
from s3t_ops.memorization.config import METHODS, UNLEARN_METHODS, UNLEARN_PROXIES, MemorizationConfig, MethodConfig, default_method

if TYPE_CHECKING:
    from s3t_ops.engine import S3T
    from s3t_ops.registry import Tracker

SINGLE_METHODS = tuple(m for m in METHODS if m != "none")
EXPERIMENT = "s3t-approximate-unlearning"
APPROXIMATE_NOTE = ("APPROXIMATE unlearning: the unlearned model is a monolithic model whose weights may still carry "
                    "information about the forgotten examples; it is only scored against a model retrained without them "
                    "(the oracle). Unlike S3T's exact deletion (`s3t forget`), no guarantee holds. The S3T state "
                    "(ledger, checkpoints, served model) is unchanged.")


def plan_variants(method: str, controls: bool = False, with_oracle: bool = True) -> tuple[list[str], str, MethodConfig | None]:
    """(variants to run, the variant that is the requested method, the vanilla MethodConfig or None).

    rum / rum_f: RUM or RUM^F; controls add its shuffle control and vanilla NegGrad+. vanilla: the tuned
    NegGrad+ step (`MemorizationConfig.vanilla`) on all of F. A single method (e.g. salun): that method on all of F, with its
    default settings (`config.default_method`). `original` (doing nothing) is always scored as a baseline.
    """
    if method not in UNLEARN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(UNLEARN_METHODS)}")
    variants = ["original"] + (["oracle"] if with_oracle else [])
    vanilla = None
    if method in ("rum", "rum_f"):
        variants.append(method)
        if controls:
            variants += [f"{method}_shuffle", "vanilla"]
        primary = method
    else:
        variants.append("vanilla")
        primary = "vanilla"
        vanilla = None if method == "vanilla" else default_method(method)
    return variants, primary, vanilla


def label(variant: str, method: str) -> str:
    """How the report names a variant (a single method runs as the `vanilla` variant)."""
    return method if variant == "vanilla" and method in SINGLE_METHODS else variant


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# --- MLflow -----------------------------------------------------------------------------------
def log_runs(tracker: "Tracker", report: dict[str, Any], seed: int, group: str, method: str,
             tags: dict[str, str] | None = None) -> dict[str, str]:
    """One MLflow run per variant of one report (`UnlearningReport.to_dict()`); returns variant -> run id."""
    out = {}
    for variant, row in report["variants"].items():
        params = {"variant": variant, "method": row.get("method", variant), "requested_method": method, "proxy": report["proxy"],
                  "bins": json.dumps(row.get("bins", {})), "seed": seed, "n_forget": report["n_forget"], "n_train": report["n_train"],
                  "forget_ids_sha256": ids_digest(report["forget_ids"]), "config": json.dumps(report["config"], sort_keys=True)}
        values = {"forget_accuracy": row.get("forget"), "retain_accuracy": row.get("retain"), "test_accuracy": row.get("test"),
                  "mia": row.get("mia"), "tow": row.get("tow"), "tow_mia": row.get("tow_mia"), "seconds": row.get("seconds"),
                  "grad_example_steps": row.get("grad_example_steps"),
                  **{k: v for k, v in row.items() if k.startswith("gap_")}}
        out[variant] = tracker.log_unlearning(f"{label(variant, method)}-seed{seed}", params, values,
                                              tags={"s3t.unlearning_id": group, "s3t.variant": variant, "s3t.seed": seed, **(tags or {})})
    return out


def tracker_for(state_dir: str | Path, tracking_uri: str | None = None) -> "Tracker":
    from s3t_ops.registry import Tracker, default_artifact_root, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(state_dir)
    return Tracker(uri, experiment=EXPERIMENT, artifact_root=default_artifact_root(state_dir))


# --- report -------------------------------------------------------------------------------------
def plot(path: Path, summary: dict[str, dict[str, dict[str, float]]], title: str) -> Path:
    """ToW and ToW-MIA per variant: mean with the 95% interval over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in summary.items() if "tow" in m]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2), dpi=120)
    for j, (metric, name) in enumerate((("tow", "ToW"), ("tow_mia", "ToW-MIA"))):
        means = [summary[n][metric]["mean"] for n in names]
        err = [[summary[n][metric]["mean"] - summary[n][metric]["low"] for n in names],
               [summary[n][metric]["high"] - summary[n][metric]["mean"] for n in names]]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], means, width=0.4, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("vs the retrained oracle (1 = identical)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report printed by `s3t unlearn`."""
    s = result["summary"]
    n = result["seeds"]
    lines = ["=" * 100, APPROXIMATE_NOTE, "=" * 100,
             f"method {result['method']} (proxy {result['proxy']}), forget set {result['n_forget']} of {result['n_train']} training "
             f"examples, {len(n)} seed(s) {n}" + ("; mean [95% interval]" if len(n) > 1 else "")]

    def cell(m: dict[str, float] | None, width: int) -> str:
        if not m or m["n"] == 0:
            return "-".rjust(width)
        text = f"{m['mean']:.3f}" + (f" [{m['low']:.3f}, {m['high']:.3f}]" if m["n"] > 1 else "")
        return text.rjust(width)

    w = 22 if len(n) > 1 else 11
    head = f"{'variant':16s}" + "".join(h.rjust(w) for h in ("acc forget", "acc retain", "acc test", "MIA", "ToW", "ToW-MIA"))
    lines += [head + "  seconds"]
    for name, m in s.items():
        lines.append(f"{name:16s}" + "".join(cell(m.get(k), w) for k in ("forget", "retain", "test", "mia", "tow", "tow_mia"))
                     + f"  {m['seconds']['mean']:7.1f}")
    primary = result["primary"]
    if "tow" in s.get(primary, {}):
        p, o = s[primary], s.get("original", {})
        lines.append(f"{primary}: ToW {p['tow']['mean']:.3f}, ToW-MIA {p['tow_mia']['mean']:.3f} vs doing nothing (original) "
                     f"ToW {o['tow']['mean']:.3f}, ToW-MIA {o['tow_mia']['mean']:.3f} (1 = indistinguishable from the oracle on these metrics)")
        best = max((k for k in s if "tow" in s[k]), key=lambda k: s[k]["tow"]["mean"])
        lines.append(f"closest to the oracle by mean ToW: {best}")
    else:
        lines.append("no oracle was trained (--no-oracle): accuracies and MIA only, nothing is scored")
    lines.append(f"report: {result['json']}" + (f"   plot: {result['png']}" if result.get("png") else ""))
    lines.append(f"unlearned model ({primary}, seed {n[0]}): {result['model']}")
    if result.get("mlflow"):
        lines.append(f"MLflow: {result['mlflow']['runs']} run(s) in experiment '{EXPERIMENT}' at {result['mlflow']['tracking_uri']} "
                     f"(tag s3t.unlearning_id={result['id']})")
    return "\n".join(lines)


# --- `s3t unlearn` --------------------------------------------------------------------------------
def unlearn_command(
    state_dir: str | Path,
    method: str = "rum",
    proxy: str = "confidence",
    forget_ids: Sequence[str] | None = None,
    n_forget: int = 30,
    seeds: int = 1,
    controls: bool = False,
    with_oracle: bool = True,
    mcfg: MemorizationConfig | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    retrain: bool = False,
    progress: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:
    """Approximate unlearning on an S3T state over `seeds` seeds (mcfg.seed, +1, ...), the forget set fixed.

    Writes `<state>/memorization/runs/<stamp>-<method>/` (report.json, report.png with an oracle, the
    requested method's model of the first seed) and logs one MLflow run per variant and seed.
    progress(total_phases, phase) is called as each phase starts ("seed 1/3: oracle", ...).
    Returns the JSON-safe result (also in report.json).
    """
    from s3t_ops.engine import S3T

    if proxy not in UNLEARN_PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose from {', '.join(UNLEARN_PROXIES)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    variants, primary, vanilla = plan_variants(method, controls, with_oracle)
    base = (mcfg or MemorizationConfig()).replace(proxy=proxy)
    t0 = time.perf_counter()
    engine = S3T.open(state_dir, progress=False)
    splits = wf.splits_from_engine(engine)
    forget = wf.check_forget_ids(splits, forget_ids) if forget_ids is not None else wf.select_forget_set(splits.train.ids, n_forget, base.seed)
    uses_scores = any(v.startswith("rum") for v in variants)
    total = seeds * (2 + len(wf.phases(variants))) + (1 if proxy == "inventory" and uses_scores else 0)
    note = progress or (lambda total, phase: None)
    inventory = None
    if proxy == "inventory" and uses_scores:
        note(total, "inventory estimate")
        inventory = scores.inventory_scores(engine)
    group = stamp()
    folder = Path(state_dir) / "memorization" / "runs" / f"{group}-{method}"
    tracker = tracker_for(state_dir, tracking_uri) if mlflow else None
    reports, run_ids, model_path = [], {}, None
    for k in range(seeds):
        mcfg_k = base.replace(seed=base.seed + k)
        tag = f"seed {k + 1}/{seeds}: " if seeds > 1 else ""
        rep = wf.unlearn_state(state_dir, forget, mcfg=mcfg_k, variants=variants, retrain=retrain, holdout=False,
                               inventory=proxy == "inventory" and uses_scores, vanilla=vanilla, engine=engine, splits=splits,
                               inventory_table=inventory, progress=lambda phase, tag=tag: note(total, tag + phase))
        if model_path is None:
            model_path = wf.save_state(folder / "model.safetensors", rep.states[primary],
                                       {"approximate": True, "method": method, "proxy": proxy, "seed": mcfg_k.seed,
                                        "forget_ids_sha256": ids_digest(forget), "config": mcfg_k.to_dict()})
        d = rep.to_dict()
        d["variants"] = {label(v, method): row for v, row in d["variants"].items()}
        reports.append(d)
        if tracker is not None:
            run_ids[mcfg_k.seed] = log_runs(tracker, rep.to_dict(), mcfg_k.seed, group, method,
                                            tags={"s3t.source": "cli", "s3t.report": str(folder / "report.json")})
    summary = metrics.summarize([r["variants"] for r in reports])
    result = {
        "approximate": True, "note": APPROXIMATE_NOTE, "id": group, "state": str(state_dir), "method": method, "proxy": proxy,
        "primary": label(primary, method), "variants": [label(v, method) for v in variants], "controls": controls,
        "seeds": [base.seed + k for k in range(seeds)], "n_forget": len(forget), "n_train": len(splits.train),
        "forget_ids": forget, "config": base.to_dict(), "summary": summary, "runs": reports,
        "json": str(folder / "report.json"), "png": None, "model": str(model_path),
        "mlflow": {"tracking_uri": tracker.uri, "experiment": EXPERIMENT, "runs": sum(len(v) for v in run_ids.values()),
                   "run_ids": {str(k): v for k, v in run_ids.items()}} if tracker is not None else None,
        "seconds": time.perf_counter() - t0,
    }
    if with_oracle:
        result["png"] = str(plot(folder / "report.png", {k: v for k, v in summary.items() if "tow" in v},
                                 f"APPROXIMATE unlearning ({method}, proxy {proxy}) vs retrained oracle, {seeds} seed(s)"))
    write_json(folder / "report.json", result)
    return result


# --- Dagster assets (pipelines/assets/memorization.py) ------------------------------------------------
def scores_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "memorization" / "scores"


def materialize_scores(engine: "S3T", mcfg: MemorizationConfig, holdout: bool = True, inventory: bool = True,
                       subsampled: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The `memorization_scores` asset: the original model (cached) and one score per live training id.

    Columns: the four training-time proxies, holdout retraining, the S3T-inventory estimate (free: the
    stage checkpoints already did and did not see each example) and optionally the subsampled true
    score. Writes `scores/scores.parquet` and `scores/scores.json` (timings, Spearman agreement)."""
    log = log or (lambda msg: None)
    state_dir = engine.cfg.state_dir
    splits = wf.splits_from_engine(engine)
    clf = wf.classifier_for(engine.backbone, len(splits.label_names), mcfg)
    original, folder, cached = wf.load_or_train_original(clf, splits, mcfg, state_dir)
    seconds = {"original": 0.0 if cached else original.training.seconds}
    log(f"original model {'loaded from' if cached else 'trained into'} {folder}")
    table = original.proxies.reindex(splits.train.ids)
    table.index.name = "id"
    if holdout:
        t = time.perf_counter()
        table["holdout_retraining"] = proxies.holdout_retraining(
            clf, original.state, splits.val, splits.train, lr=mcfg.holdout_lr, max_epochs=mcfg.holdout_max_epochs,
            patience=mcfg.holdout_patience, batch_size=mcfg.batch_size, seed=mcfg.seed)
        seconds["holdout_retraining"] = time.perf_counter() - t
    if inventory:
        t = time.perf_counter()
        inv = scores.inventory_scores(engine)
        table["inventory"] = inv["memorization"].reindex(table.index)
        seconds["inventory"] = time.perf_counter() - t
    if subsampled:
        t = time.perf_counter()
        true = scores.subsampled_memorization(clf, splits.train, mcfg.subsample_models, mcfg.subsample_fraction, mcfg.epochs,
                                              mcfg.lr, mcfg.batch_size, mcfg.seed)
        table["memorization"] = true["memorization"]
        seconds["memorization"] = time.perf_counter() - t
    out = scores_dir(state_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "scores.tmp"
    table.to_parquet(tmp)
    os.replace(tmp, out / "scores.parquet")
    agreement = {truth: wf.proxy_agreement(table, truth) for truth in ("memorization", "inventory") if truth in table.columns}
    meta = {"config": mcfg.to_dict(), "original": str(folder), "n_train": len(table), "train_ids_sha256": ids_digest(splits.train.ids),
            "seconds": seconds, "spearman": agreement, "columns": list(table.columns),
            "unscored": {c: int(table[c].isna().sum()) for c in table.columns}}
    write_json(out / "scores.json", meta)
    return {**meta, "path": str(out / "scores.parquet")}


def load_scores(engine: "S3T") -> tuple[MemorizationConfig, pd.DataFrame, wf.Splits, wf.MonolithicClassifier, wf.OriginalModel]:
    """What `materialize_scores` left, checked against the state's current live training data."""
    folder = scores_dir(engine.cfg.state_dir)
    if not (folder / "scores.json").is_file():
        raise FileNotFoundError(f"{folder}/scores.json: materialize memorization_scores first")
    meta = json.loads((folder / "scores.json").read_text())
    splits = wf.splits_from_engine(engine)
    if ids_digest(splits.train.ids) != meta["train_ids_sha256"]:
        raise RuntimeError("the live training data changed since memorization_scores was materialized (deletions?); "
                           "materialize memorization_scores again")
    mcfg = MemorizationConfig.from_dict(meta["config"])
    clf = wf.classifier_for(engine.backbone, len(splits.label_names), mcfg)
    return mcfg, pd.read_parquet(folder / "scores.parquet"), splits, clf, wf.OriginalModel.load(meta["original"])


def materialize_unlearned(engine: "S3T", method: str = "rum", proxy: str = "confidence", forget_ids: Sequence[str] | None = None,
                          n_forget: int = 30) -> dict[str, Any]:
    """The `rum_unlearned` asset: the requested method applied to the original model (no oracle here).

    Writes `unlearned/model.safetensors` and `unlearned/unlearned.json` (forget ids, bins, steps,
    accuracy on forget / retain / test and MIA)."""
    if proxy not in UNLEARN_PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose from {', '.join(UNLEARN_PROXIES)}")
    mcfg, table, splits, clf, original = load_scores(engine)
    mcfg = mcfg.replace(proxy=proxy)
    variants, primary, vanilla = plan_variants(method, controls=False, with_oracle=False)
    forget = wf.check_forget_ids(splits, forget_ids) if forget_ids else wf.select_forget_set(splits.train.ids, n_forget, mcfg.seed)
    mem = rescore = None
    unscored = 0
    if primary.startswith("rum"):
        mem, unscored, rescore = wf.refinement(clf, splits, forget, table, mcfg)
    res = wf.run_variant(clf, splits, original.state, forget, primary, mcfg, mem, vanilla, rescore)
    ev = metrics.evaluate(clf, res.state, splits.train, forget, splits.test, seed=mcfg.seed)
    out = Path(engine.cfg.state_dir) / "memorization" / "unlearned"
    extra = dict(res.extra)
    info = {"approximate": True, "note": APPROXIMATE_NOTE, "method": method, "variant": primary, "proxy": proxy,
            "variant_method": extra.pop("method", method), **extra,
            "forget_ids": forget, "n_forget": len(forget), "n_train": len(splits.train), "unscored": unscored,
            "vanilla": vanilla.to_dict() if vanilla else None, "config": mcfg.to_dict(), **ev.to_dict(),
            "seconds": res.seconds, "grad_example_steps": res.grad_example_steps}
    wf.save_state(out / "model.safetensors", res.state, {"approximate": True, "method": method, "proxy": proxy})
    write_json(out / "unlearned.json", info)
    return {**info, "path": str(out / "model.safetensors")}


def materialize_report(engine: "S3T", controls: bool = True, tracker: "Tracker | None" = None,
                       tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The `unlearning_report` asset: the `rum_unlearned` model, the original and (with controls) its shuffle
    control and vanilla, scored against the oracle; JSON + PNG under `report/`, one MLflow run per variant."""
    mcfg, table, splits, clf, original = load_scores(engine)
    folder = Path(engine.cfg.state_dir) / "memorization" / "unlearned"
    if not (folder / "unlearned.json").is_file():
        raise FileNotFoundError(f"{folder}/unlearned.json: materialize rum_unlearned first")
    info = json.loads((folder / "unlearned.json").read_text())
    forget = wf.check_forget_ids(splits, info["forget_ids"])
    mcfg = mcfg.replace(proxy=info["proxy"])
    method = info["method"]
    variants, primary, vanilla = plan_variants(method, controls, with_oracle=True)
    given = {primary: wf.VariantResult(wf.load_state(folder / "model.safetensors"), info["seconds"], info["grad_example_steps"],
                                       {"method": info["variant_method"], **{k: info[k] for k in ("steps", "bins") if k in info}})}
    rep = wf.run_unlearning(clf, splits, original.state, forget, table, mcfg, variants, vanilla=vanilla, given=given)
    d = rep.to_dict()
    group = stamp()
    run_ids = log_runs(tracker, d, mcfg.seed, group, method, tags={"s3t.source": "dagster", **(tags or {})}) if tracker else {}
    d["variants"] = {label(v, method): row for v, row in d["variants"].items()}
    summary = metrics.summarize([d["variants"]])
    out = Path(engine.cfg.state_dir) / "memorization" / "report"
    result = {**d, "note": APPROXIMATE_NOTE, "id": group, "method": method, "primary": label(primary, method), "summary": summary,
              "mlflow": {"tracking_uri": tracker.uri, "experiment": EXPERIMENT, "run_ids": run_ids} if tracker else None,
              "json": str(out / "report.json"),
              "png": str(plot(out / "report.png", summary, f"APPROXIMATE unlearning ({method}, proxy {info['proxy']}) vs retrained oracle"))}
    write_json(out / "report.json", result)
    return result

"""The state-folder doors of approximate unlearning, on one path: `s3t unlearn` and the Dagster memorization assets.

Everything here is APPROXIMATE unlearning of a monolithic model trained on an S3T state's live data:
the unlearned model's weights may still carry information about the forgotten examples, and it is
only scored against a model retrained without them (the oracle). The S3T state itself (ledger,
checkpoints, served ensemble) is never changed; `s3t forget` is the exact path.

Both doors take the same steps, and only these:
  prepare                      the live data, the classifier, the original model (cached by store.py)
  workflow.memorization_scores the score table (the S3T-inventory estimate is computed once per call)
  workflow.run_unlearning      the requested variants, each scored against the oracle
  the report                   variants named by `workflow.label`, summary over seeds, JSON + PNG (store.py),
                               one MLflow run per variant and seed (`log_runs`), tagged with its artifact
`s3t unlearn` takes them in one call per seed (`unlearn_state`) into runs/<stamp>-<method>/; the assets
split them: memorization_scores -> rum_unlearned (the method alone, no oracle) -> unlearning_report
(with the oracle and controls). The files, and their erasure, are store.py's.
"""
from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from s3t_ops.memorization import artifacts as store
from s3t_ops.memorization import metrics, scores
from s3t_ops.memorization import workflow as wf
from s3t_ops.memorization.config import UNLEARN_PROXIES, MemorizationConfig, MethodConfig
from s3t_ops.classifier import MonolithicClassifier
from s3t_ops.memorization.report import APPROXIMATE_NOTE, figure

if TYPE_CHECKING:
    from s3t_ops.engine import S3T
    from s3t_ops.tracker import Tracker

EXPERIMENT = "s3t-approximate-unlearning"


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# --- MLflow -----------------------------------------------------------------------------------
def log_runs(tracker: "Tracker", report: dict[str, Any], seed: int, group: str, method: str, artifact: str,
             tags: dict[str, str] | None = None) -> dict[str, str]:
    """One MLflow run per variant of one report (`UnlearningReport.to_dict()`); returns variant -> run id.

    artifact: the artifact the report is written to (`store.Writer.name`), tagged `store.ARTIFACT_TAG` so
    that erasing it finds these runs."""
    out = {}
    for variant, row in report["variants"].items():
        params = {"variant": variant, "method": row.get("method", variant), "requested_method": method, "proxy": report["proxy"],
                  "bins": json.dumps(row.get("bins", {})), "seed": seed, "n_forget": report["n_forget"], "n_train": report["n_train"],
                  "forget_ids_sha256": wf.ids_digest(report["forget_ids"]), "config": json.dumps(report["config"], sort_keys=True)}
        values = {"forget_accuracy": row.get("forget"), "retain_accuracy": row.get("retain"), "test_accuracy": row.get("test"),
                  "mia": row.get("mia"), "tow": row.get("tow"), "tow_mia": row.get("tow_mia"), "seconds": row.get("seconds"),
                  "grad_example_steps": row.get("grad_example_steps"),
                  **{k: v for k, v in row.items() if k.startswith("gap_")}}
        out[variant] = tracker.log_unlearning(f"{wf.label(variant, method)}-seed{seed}", params, values,
                                              tags={"s3t.unlearning_id": group, "s3t.variant": variant, "s3t.seed": seed,
                                                    store.ARTIFACT_TAG: artifact, **(tags or {})})
    return out


def tracker_for(engine: "S3T", tracking_uri: str | None = None) -> "Tracker":
    """The state's MLflow store (or `tracking_uri`), experiment EXPERIMENT; runs carry the state's id, so the state's
    erasure finds them."""
    from s3t_ops.tracker import Tracker, default_artifact_root, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(engine.root)
    return Tracker(uri, experiment=EXPERIMENT, artifact_root=default_artifact_root(engine.root), state_id=engine.ledger.get_meta("state_id"))


# --- the steps ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What every step needs of a state: its live data, the classifier and the original model."""

    splits: wf.Splits
    clf: MonolithicClassifier
    original: wf.OriginalModel
    folder: str  # where the original model is cached (a local folder or a URL: the state's storage)
    cached: bool  # loaded from there, not trained by this call


def prepare(engine: "S3T", mcfg: MemorizationConfig, splits: wf.Splits | None = None, retrain: bool = False) -> Prepared:
    """The original model of `mcfg` on the live training set: from the store's cache, or trained and cached
    (retrain=True: always trained)."""
    splits = splits or wf.splits_from_engine(engine)
    clf = wf.classifier_for(engine.backbone, len(splits.label_names), mcfg)
    original = None if retrain else wf.original_from(store.load_original(engine.storage, splits.train.ids, mcfg))
    cached = original is not None
    if original is None:
        original = wf.train_original(clf, splits, mcfg)
        store.save_original(engine.storage, splits.train.ids, mcfg, *wf.original_parts(original))
    return Prepared(splits, clf, original, store.location(engine.storage, store.original_name(splits.train.ids, mcfg)), cached)


def unlearn_state(
    state_dir: str | Path,
    forget_ids: Sequence[str] | None = None,
    n_forget: int = 30,
    mcfg: MemorizationConfig | None = None,
    variants: Sequence[str] = wf.VARIANTS,
    retrain: bool = False,
    holdout: bool = True,
    inventory: bool = True,
    vanilla: MethodConfig | None = None,
    progress: Callable[[str], None] | None = None,
    engine: "S3T | None" = None,
    splits: wf.Splits | None = None,
    inventory_table: pd.DataFrame | None = None,
) -> wf.UnlearningReport:
    """All the steps but the report, for one seed: approximate unlearning of a monolithic model on an S3T
    state's live data.

    forget_ids default: `n_forget` training ids chosen by a seeded hash. The forget ids must be live
    training examples (ids already deleted from S3T are gone from the data).
    engine / splits / inventory_table: reuse what a caller already has (e.g. over several seeds).
    progress(phase): "original", "scores", then `workflow.phases(variants)`.
    """
    from s3t_ops.engine import S3T

    mcfg = mcfg or MemorizationConfig()
    note = progress or (lambda phase: None)
    if mcfg.proxy == "memorization":
        raise ValueError("proxy 'memorization' needs the subsampled true score; use run_unlearning with memorization_scores(subsampled=True)")
    engine = engine or S3T.open(state_dir, progress=False)
    splits = splits or wf.splits_from_engine(engine)
    forget = (wf.check_forget_ids(splits, forget_ids) if forget_ids is not None
              else wf.select_forget_set(splits.train.ids, n_forget, mcfg.seed))
    note("original")
    prep = prepare(engine, mcfg, splits, retrain)
    note("scores")
    inv = None
    if inventory or mcfg.proxy == "inventory":
        inv = inventory_table if inventory_table is not None else scores.inventory_scores(engine)
    table = wf.memorization_scores(prep.clf, splits, prep.original, mcfg, holdout=holdout or mcfg.proxy == "holdout_retraining",
                                   inventory=inv)
    return wf.run_unlearning(prep.clf, splits, prep.original.state, forget, table, mcfg, variants, vanilla=vanilla, progress=progress)


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

    Writes the store's `runs/<stamp>-<method>` artifact (report.json, report.png with an oracle, the
    requested method's model of the first seed) and logs one MLflow run per variant and seed.
    progress(total_phases, phase) is called as each phase starts ("seed 1/3: oracle", ...).
    Returns the JSON-safe result (also in report.json).
    """
    from s3t_ops.engine import S3T

    if proxy not in UNLEARN_PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose from {', '.join(UNLEARN_PROXIES)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    variants, primary, vanilla = wf.plan_variants(method, controls, with_oracle)
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
    tracker = tracker_for(engine, tracking_uri) if mlflow else None
    reports, run_ids, model_path = [], {}, None
    with store.writer(engine.storage, store.run_name(group, method),
                      wf.data_ids(splits, val=proxy == "holdout_retraining", test=True)) as run:
        for k in range(seeds):
            mcfg_k = base.replace(seed=base.seed + k)
            tag = f"seed {k + 1}/{seeds}: " if seeds > 1 else ""
            rep = unlearn_state(state_dir, forget, mcfg=mcfg_k, variants=variants, retrain=retrain, holdout=False,
                                inventory=proxy == "inventory" and uses_scores, vanilla=vanilla, engine=engine, splits=splits,
                                inventory_table=inventory, progress=lambda phase, tag=tag: note(total, tag + phase))
            if model_path is None:
                model_path = run.save_model(rep.states[primary],
                                            {"approximate": True, "method": method, "proxy": proxy, "seed": mcfg_k.seed,
                                             "forget_ids_sha256": wf.ids_digest(forget), "config": mcfg_k.to_dict()})
            reports.append(wf.labelled(rep.to_dict(), method))
            if tracker is not None:
                run_ids[mcfg_k.seed] = log_runs(tracker, rep.to_dict(), mcfg_k.seed, group, method, run.name,
                                                tags={"s3t.source": "cli", "s3t.report": run.report_json})
        summary = metrics.summarize([r["variants"] for r in reports])
        result = {
            "approximate": True, "note": APPROXIMATE_NOTE, "id": group, "state": str(state_dir), "method": method, "proxy": proxy,
            "primary": wf.label(primary, method), "variants": [wf.label(v, method) for v in variants], "controls": controls,
            "seeds": [base.seed + k for k in range(seeds)], "n_forget": len(forget), "n_train": len(splits.train),
            "forget_ids": forget, "config": base.to_dict(), "summary": summary, "runs": reports,
            "json": None, "png": None, "model": model_path,
            "mlflow": {"tracking_uri": tracker.uri, "experiment": EXPERIMENT, "runs": sum(len(v) for v in run_ids.values()),
                       "run_ids": {str(k): v for k, v in run_ids.items()}} if tracker is not None else None,
            "seconds": time.perf_counter() - t0,
        }
        plot = (figure({k: v for k, v in summary.items() if "tow" in v},
                       f"APPROXIMATE unlearning ({method}, proxy {proxy}) vs retrained oracle, {seeds} seed(s)") if with_oracle else None)
        result = run.save_report(result, plot)
    return result


# --- the Dagster memorization assets ------------------------------------------------------------
def materialize_scores(engine: "S3T", mcfg: MemorizationConfig, holdout: bool = True, inventory: bool = True,
                       subsampled: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The `memorization_scores` asset: the original model (cached) and one score per live training id.

    Columns: the four training-time proxies, holdout retraining, the S3T-inventory estimate (free: the
    stage checkpoints already did and did not see each example) and optionally the subsampled true
    score. Saved as the store's `scores` artifact, with timings and Spearman agreement."""
    log = log or (lambda msg: None)
    prep = prepare(engine, mcfg)
    seconds = {"original": 0.0 if prep.cached else prep.original.training.seconds}
    log(f"original model {'loaded from' if prep.cached else 'trained into'} {prep.folder}")
    inv = None
    if inventory:
        t = time.perf_counter()
        inv = scores.inventory_scores(engine)
        seconds["inventory"] = time.perf_counter() - t
    table = wf.memorization_scores(prep.clf, prep.splits, prep.original, mcfg, holdout=holdout, subsampled=subsampled,
                                   inventory=inv, seconds=seconds)
    agreement = {truth: wf.proxy_agreement(table, truth) for truth in ("memorization", "inventory") if truth in table.columns}
    meta = {"config": mcfg.to_dict(), "original": prep.folder, "n_train": len(table),
            "train_ids_sha256": wf.ids_digest(prep.splits.train.ids), "seconds": seconds, "spearman": agreement,
            "columns": list(table.columns), "unscored": {c: int(table[c].isna().sum()) for c in table.columns}}
    path = store.save_scores(engine.storage, table, meta, wf.data_ids(prep.splits, val=holdout))
    return {**meta, "path": path}


@dataclass
class Scored:
    """What `materialize_scores` left, on the state's current live data."""

    mcfg: MemorizationConfig
    table: pd.DataFrame
    ids: list[str]  # the ids the scores were computed from
    prep: Prepared


def scored(engine: "S3T") -> Scored:
    """The `scores` artifact, checked against the state's current live training data."""
    table, meta, ids = store.load_scores(engine.storage)
    splits = wf.splits_from_engine(engine)
    if wf.ids_digest(splits.train.ids) != meta["train_ids_sha256"]:
        raise RuntimeError("the live training data changed since memorization_scores was materialized (deletions?); "
                           "materialize memorization_scores again")
    mcfg = MemorizationConfig.from_dict(meta["config"])
    return Scored(mcfg, table, ids, prepare(engine, mcfg, splits))


def materialize_unlearned(engine: "S3T", method: str = "rum", proxy: str = "confidence", forget_ids: Sequence[str] | None = None,
                          n_forget: int = 30) -> dict[str, Any]:
    """The `rum_unlearned` asset: the requested method applied to the original model (no oracle here).

    Saved as the store's `unlearned` artifact: the model and its record (forget ids, bins, steps,
    accuracy on forget / retain / test and MIA)."""
    if proxy not in UNLEARN_PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose from {', '.join(UNLEARN_PROXIES)}")
    s = scored(engine)
    splits = s.prep.splits
    mcfg = s.mcfg.replace(proxy=proxy)
    variants, primary, vanilla = wf.plan_variants(method, controls=False, with_oracle=False)
    forget = wf.check_forget_ids(splits, forget_ids) if forget_ids else wf.select_forget_set(splits.train.ids, n_forget, mcfg.seed)
    rep = wf.run_unlearning(s.prep.clf, splits, s.prep.original.state, forget, s.table, mcfg, [primary], vanilla=vanilla)
    row = rep.variants[primary]
    info = {"approximate": True, "note": APPROXIMATE_NOTE, "method": method, "variant": primary, "proxy": proxy,
            "variant_method": row["method"], **{k: row[k] for k in ("steps", "bins") if k in row},
            "forget_ids": forget, "n_forget": len(forget), "n_train": len(splits.train), "unscored": rep.unscored,
            "vanilla": vanilla.to_dict() if vanilla else None, "config": mcfg.to_dict(),
            **{k: row[k] for k in ("forget", "retain", "test", "mia", "seconds", "grad_example_steps")}}
    path = store.save_unlearned(engine.storage, rep.states[primary], info, [*s.ids, *splits.test.ids],
                                {"approximate": True, "method": method, "proxy": proxy})
    return {**info, "path": path}


def materialize_report(engine: "S3T", controls: bool = True, tracker: "Tracker | None" = None,
                       tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The `unlearning_report` asset: the `rum_unlearned` model, the original and (with controls) its shuffle
    control and vanilla, scored against the oracle; the store's `report` artifact (JSON + PNG), one MLflow
    run per variant."""
    s = scored(engine)
    splits = s.prep.splits
    state, info = store.load_unlearned(engine.storage)
    forget = wf.check_forget_ids(splits, info["forget_ids"])
    mcfg = s.mcfg.replace(proxy=info["proxy"])
    method = info["method"]
    variants, primary, vanilla = wf.plan_variants(method, controls, with_oracle=True)
    given = {primary: wf.VariantResult(state, info["seconds"], info["grad_example_steps"],
                                       {"method": info["variant_method"], **{k: info[k] for k in ("steps", "bins") if k in info}})}
    rep = wf.run_unlearning(s.prep.clf, splits, s.prep.original.state, forget, s.table, mcfg, variants, vanilla=vanilla, given=given)
    d = rep.to_dict()
    group = stamp()
    with store.writer(engine.storage, store.REPORT, [*s.ids, *splits.test.ids]) as w:
        run_ids = log_runs(tracker, d, mcfg.seed, group, method, w.name, tags={"s3t.source": "dagster", **(tags or {})}) if tracker else {}
        d = wf.labelled(d, method)
        summary = metrics.summarize([d["variants"]])
        result = {**d, "note": APPROXIMATE_NOTE, "id": group, "method": method, "primary": wf.label(primary, method), "summary": summary,
                  "mlflow": {"tracking_uri": tracker.uri, "experiment": EXPERIMENT, "run_ids": run_ids} if tracker else None}
        result = w.save_report(result, figure(summary, f"APPROXIMATE unlearning ({method}, proxy {info['proxy']}) vs retrained oracle"))
    return result

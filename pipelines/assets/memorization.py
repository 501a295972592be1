"""Memorization: scores (proxies + the S3T inventory estimate), an APPROXIMATELY unlearned monolithic model (RUM and
baselines), and its report against a retrained oracle.

They are assets users look at (on the graph, beside the stages they read) but not assets to materialize with the
rest: each trains extra models, so "Materialize all" must never take them along. Dagster's "Materialize all" covers
every executable asset on the page, so they are declared as external asset specs (not executable from the graph)
and produced by the `memorization` job, whose ops record their materializations (Launchpad config below). Each op is
one step of the path `s3t unlearn` takes too (s3t_ops/memorization/service.py); what they leave in the state's
storage (memorization/), and its erasure after deletions, is s3t_ops/memorization/artifacts.py's.
"""

import time

import dagster as dg

from pipelines.resources import MlflowResource, S3TResource
from s3t_ops.memorization.config import UNLEARN_METHODS, UNLEARN_PROXIES, MemorizationConfig

_D = MemorizationConfig()
GROUP = "memorization"
JOB = "memorization"


def _memorization_fields() -> dict:
    """MemorizationConfig's fields for the Launchpad, declared once (s3t_ops/memorization/config.py), with their help."""
    from pydantic import Field

    from s3t_ops.config import flag_fields, plain_type

    out = {"__annotations__": {}}
    for f in flag_fields(MemorizationConfig):
        out["__annotations__"][f.name] = plain_type(f)
        out[f.name] = Field(default=getattr(_D, f.name), description=f.metadata["help"])
    return out


class _ScoresChoices(dg.Config):
    holdout: bool = True  # holdout-retraining proxy (fine-tunes a copy on the validation split)
    inventory: bool = True  # the free estimate from the S3T stage checkpoints
    subsampled: bool = False  # the costly true score: subsample_models trainings on 70% subsets


# the asset's choices above plus MemorizationConfig's own fields (depth, epochs, lr, seed, subsample_models)
MemorizationScoresConfig = type("MemorizationScoresConfig", (_ScoresChoices,), _memorization_fields())


class RumUnlearnedConfig(dg.Config):
    method: str = "rum"  # rum | rum_f | vanilla | finetune | neggrad | neggrad_plus | l1_sparse | random_label | salun
    proxy: str = "confidence"  # a column of memorization_scores that RUM ranks the forget set by
    n_forget: int = 30  # without forget_ids: this many training ids chosen by a seeded hash
    forget_ids: list[str] = []


class UnlearningReportConfig(dg.Config):
    controls: bool = True  # also the shuffle control (random bins) and vanilla NegGrad+, for RUM methods


def _md_table(rows: dict, cols: tuple[str, ...]) -> str:
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else "-" for c in cols) + " |")
    return "\n".join(lines)


def build_memorization_specs(L: int) -> list[dg.AssetSpec]:
    how = f" Produced by the `{JOB}` job (Jobs -> {JOB} -> Launchpad), never by \"Materialize all\"."
    return [
        dg.AssetSpec("memorization_scores", group_name=GROUP, deps=["slice_data", *(f"stage_{k}" for k in range(1, L + 1))],
                     description="Per live training example: memorization proxies logged while training a monolithic model "
                                 "(confidence, max confidence, negative entropy, binary accuracy), holdout retraining, the free "
                                 "estimate from the S3T checkpoint inventory, optionally the subsampled true score." + how),
        dg.AssetSpec("rum_unlearned", group_name=GROUP, deps=["memorization_scores"],
                     description="APPROXIMATE unlearning of the monolithic model (RUM, RUM^F, vanilla NegGrad+ or one method). "
                                 "Not exact: its weights may still carry information about the forgotten examples; the S3T "
                                 "state is unchanged (the forget job is the exact path)." + how),
        dg.AssetSpec("unlearning_report", group_name=GROUP, deps=["rum_unlearned"],
                     description="The unlearned model scored against an oracle retrained without the forget set (accuracy on "
                                 "forget/retain/test, SVC-MIA, ToW, ToW-MIA), with controls; JSON + PNG; one MLflow run per "
                                 "variant (tags s3t.kind=approximate_unlearning, s3t.memorization_artifact=report)." + how),
    ]


@dg.op(name="memorization_scores", out=dg.Out(dg.Nothing), description="Materializes the memorization_scores asset.")
def memorization_scores_op(context: dg.OpExecutionContext, config: MemorizationScoresConfig, s3t: S3TResource) -> None:
    from s3t_ops.memorization.service import materialize_scores

    t0 = time.perf_counter()
    from s3t_ops.config import flag_fields

    mcfg = MemorizationConfig(**{f.name: getattr(config, f.name) for f in flag_fields(MemorizationConfig)})
    out = materialize_scores(s3t.engine(), mcfg, holdout=config.holdout, inventory=config.inventory,
                             subsampled=config.subsampled, log=context.log.info)
    spearman = {f"spearman_vs_{truth}": dg.MetadataValue.json({k: round(v, 4) for k, v in agree.items()})
                for truth, agree in out["spearman"].items()}
    context.log_event(dg.AssetMaterialization("memorization_scores", metadata={
        "n_train": out["n_train"], "columns": dg.MetadataValue.json(out["columns"]),
        "seconds": dg.MetadataValue.json({k: round(v, 2) for k, v in out["seconds"].items()}),
        "unscored": dg.MetadataValue.json(out["unscored"]), **spearman,
        "path": dg.MetadataValue.path(out["path"]), "engine_seconds": time.perf_counter() - t0}))


@dg.op(name="rum_unlearned", ins={"after": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing),
       description="Materializes the rum_unlearned asset (APPROXIMATE unlearning).")
def rum_unlearned_op(context: dg.OpExecutionContext, config: RumUnlearnedConfig, s3t: S3TResource) -> None:
    from s3t_ops.memorization.service import materialize_unlearned

    if config.method not in UNLEARN_METHODS:
        raise dg.Failure(f"method must be one of {', '.join(UNLEARN_METHODS)}, got {config.method!r}")
    if config.proxy not in UNLEARN_PROXIES:
        raise dg.Failure(f"proxy must be one of {', '.join(UNLEARN_PROXIES)}, got {config.proxy!r}")
    t0 = time.perf_counter()
    out = materialize_unlearned(s3t.engine(), config.method, config.proxy, config.forget_ids or None, config.n_forget)
    context.log_event(dg.AssetMaterialization("rum_unlearned", metadata={
        "approximate": True, "method": out["method"], "proxy": out["proxy"], "n_forget": out["n_forget"],
        "bins": dg.MetadataValue.json(out.get("bins", {})), "steps": dg.MetadataValue.json(out.get("steps", [])),
        **{f"accuracy_{k}": float(out[k]) for k in ("forget", "retain", "test")}, "mia": float(out["mia"]),
        "grad_example_steps": int(out["grad_example_steps"]), "unlearning_seconds": float(out["seconds"]),
        "path": dg.MetadataValue.path(out["path"]), "engine_seconds": time.perf_counter() - t0}))


@dg.op(name="unlearning_report", ins={"after": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing),
       description="Materializes the unlearning_report asset.")
def unlearning_report_op(context: dg.OpExecutionContext, config: UnlearningReportConfig, s3t: S3TResource,
                         mlflow: MlflowResource) -> None:
    from s3t_ops.memorization.service import EXPERIMENT, materialize_report

    t0 = time.perf_counter()
    engine = s3t.engine()
    tracker = mlflow.tracker(engine, experiment=EXPERIMENT)
    out = materialize_report(engine, controls=config.controls, tracker=tracker, tags={"dagster_run_id": context.run_id})
    rows = out["variants"]
    primary = rows[out["primary"]]
    context.log_event(dg.AssetMaterialization("unlearning_report", metadata={
        "approximate": True, "method": out["method"], "proxy": out["proxy"], "n_forget": out["n_forget"],
        "tow": float(primary["tow"]), "tow_mia": float(primary["tow_mia"]),
        "original_tow": float(rows["original"]["tow"]), "original_tow_mia": float(rows["original"]["tow_mia"]),
        "table": dg.MetadataValue.md(_md_table(rows, ("forget", "retain", "test", "mia", "tow", "tow_mia"))),
        "mlflow_runs": dg.MetadataValue.json(out["mlflow"]["run_ids"] if out["mlflow"] else {}),
        "report": dg.MetadataValue.path(out["json"]), "plot": dg.MetadataValue.path(out["png"]),
        "engine_seconds": time.perf_counter() - t0}))


@dg.job(name=JOB, description="APPROXIMATE unlearning of a monolithic model on the state's data: memorization scores -> "
                              "unlearned model -> report against a retrained oracle (ops.<asset>.config in the Launchpad). "
                              "It trains models, so it runs only when asked.", executor_def=dg.in_process_executor)
def memorization_job():
    unlearning_report_op(after=rum_unlearned_op(after=memorization_scores_op()))

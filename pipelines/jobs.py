"""The forget job: Launchpad config lists example ids (or exact texts); honoured at once, champion moved in this run."""

import dagster as dg

from pipelines.resources import S3TResource


class ForgetConfig(dg.Config):
    ids: list[str]  # example ids, or exact texts of live examples (at least one)


def _refuse(message: str) -> dg.Failure:
    """A run failure that says what to change, first and alone (Dagster still keeps a stack under "View full message")."""
    return dg.Failure(description=message, allow_retries=False)


@dg.op(description="Honour deletions at once (one ledger transaction), move the registry's champion, "
                                      "erase the examples' data everywhere.")
def forget_examples(context: dg.OpExecutionContext, config: ForgetConfig, s3t: S3TResource) -> dict:
    from s3t_ops.ledger import UnknownExampleError
    from s3t_ops.publish import PublishError

    ids = [str(i).strip() for i in config.ids]
    if not ids or not all(ids):  # Dagster's config schema has no minimum length: checked first thing in the run
        raise _refuse('nothing to forget: `ids` is empty or holds a blank id; give ids or exact texts, e.g. ids: ["<id>"]')
    engine = s3t.engine(load_backbone=False, run_id=context.run_id)
    try:
        report = engine.forget(ids, texts=True)
    except (UnknownExampleError, ValueError) as exc:
        raise _refuse(str(exc)) from None
    except PublishError as exc:  # honoured and erased locally; the registry is retried by the next run or command
        raise _refuse(str(exc)) from None
    context.add_output_metadata({
        "new": len(report.new), "already_forgotten": len(report.already),
        "dirty_slices": dg.MetadataValue.json([list(d) for d in report.dirty]),
        "plan_id": report.plan_id, "model_version": str(report.model_version), "honour_ms": report.honour_seconds * 1000,
        "champion_moved_ms": (report.honour_seconds + report.publish_seconds) * 1000,
        "depths": dg.MetadataValue.json({str(c.shard): c.depth for c in report.plan.choices} if report.plan else {}),
        "grad_example_steps": report.grad_example_steps,
        "follow_up_runs": f"the deletion sensor tags the runs it starts for this request with s3t/forget_run={context.run_id}",
    })
    return {"new": list(report.new), "dirty": [list(d) for d in report.dirty]}


@dg.job(description="Forget examples by id or exact text (config: ops.forget_examples.config.ids). The champion moves in this run.",
        executor_def=dg.in_process_executor)
def forget():
    forget_examples()


def serve_job(stage_checks):
    """Record the served ensemble and re-evaluate the stage staleness checks (light: one process, no training)."""
    selection = dg.AssetSelection.assets("s3t_ensemble") | dg.AssetSelection.checks(*stage_checks)
    return dg.define_asset_job("serve", selection=selection, executor_def=dg.in_process_executor,
                               description="Record the serving plan (registered in MLflow, alias champion) and check which "
                                           "stage partitions await retraining.")


def refresh_slices_job(slice_def: dg.PartitionsDefinition):
    return dg.define_asset_job("refresh_slices", selection=["slice_data"], partitions_def=slice_def,
                               executor_def=dg.in_process_executor,
                               description="Rewrite one (shard, slice) partition without its deleted examples.")


class FindConfig(dg.Config):
    contains: str  # a word or phrase of the text (case-insensitive), or the start of an id
    limit: int = 50


@dg.op(description="Find live examples by a word of their text or the start of their id: id, split, shard, slice, text.")
def find_examples_op(context: dg.OpExecutionContext, config: FindConfig, s3t: S3TResource) -> int:
    from pipelines.assets.data import preview_table

    if not config.contains.strip():
        raise dg.Failure(description="give a word or phrase in `contains`")
    live = s3t.engine(load_backbone=False, repair=False).examples()
    needle = config.contains.strip()
    hits = live[live["text"].str.contains(needle, case=False, regex=False) | live["id"].str.startswith(needle)]
    context.add_output_metadata({"matches": len(hits), "examples": dg.MetadataValue.md(preview_table(hits.head(config.limit))),
                                 "forget": "copy an id (or the exact text) into the `forget` job's config `ids`"})
    return len(hits)


@dg.job(description="Find examples to forget (config: ops.find_examples_op.config.contains).", executor_def=dg.in_process_executor)
def find_examples():
    find_examples_op()

"""The forget job: Launchpad config lists example ids (or exact texts); honoured at once, champion moved in this run."""

import dagster as dg

from pipelines.resources import S3TResource


class ForgetConfig(dg.Config):
    ids: list[str]  # example ids, or exact texts of live examples


@dg.op(description="Honour deletions at once (one ledger transaction), move the registry's champion, "
                                      "erase the examples' data everywhere.")
def forget_examples(context: dg.OpExecutionContext, config: ForgetConfig, s3t: S3TResource) -> dict:
    from s3t_ops.ledger import UnknownExampleError

    engine = s3t.engine(load_backbone=False, run_id=context.run_id)
    try:
        report = engine.forget(engine.resolve(config.ids))
    except (UnknownExampleError, ValueError) as exc:
        raise dg.Failure(description=str(exc)) from None
    context.add_output_metadata({
        "new": len(report.new), "already_forgotten": len(report.already),
        "dirty_slices": dg.MetadataValue.json([list(d) for d in report.dirty]),
        "plan_id": report.plan_id, "model_version": str(report.model_version), "honour_ms": report.honour_seconds * 1000,
        "champion_moved_ms": (report.honour_seconds + report.publish_seconds) * 1000,
        "depths": dg.MetadataValue.json({str(c.shard): c.depth for c in report.plan.choices} if report.plan else {}),
        "grad_example_steps": report.grad_example_steps,
    })
    return {"new": list(report.new), "dirty": [list(d) for d in report.dirty]}


@dg.job(description="Forget examples by id or exact text (config: ops.forget_examples.config.ids). The champion moves in this run.",
        executor_def=dg.in_process_executor)
def forget():
    forget_examples()


# Light runs on the deletion path execute in one process: no step subprocess to start.
serve = dg.define_asset_job("serve", selection=["s3t_ensemble"], executor_def=dg.in_process_executor,
                            description="Record the serving plan and register it in MLflow (alias champion).")


def refresh_slices_job(slice_def: dg.PartitionsDefinition):
    return dg.define_asset_job("refresh_slices", selection=["slice_data"], partitions_def=slice_def,
                               executor_def=dg.in_process_executor,
                               description="Rewrite one (shard, slice) partition without its deleted examples.")

"""The forget job: Launchpad config lists example ids; the request is durable in the ledger and honoured at once."""

import dagster as dg

from pipelines.resources import S3TResource


class ForgetConfig(dg.Config):
    ids: list[str]


@dg.op(pool="s3t_ledger", description="Write deletion requests, serve a plan without them, erase their data.")
def forget_examples(context: dg.OpExecutionContext, config: ForgetConfig, s3t: S3TResource) -> dict:
    report = s3t.engine(load_backbone=False).forget(config.ids)
    context.add_output_metadata({
        "new": len(report.new), "already_forgotten": len(report.already),
        "dirty_slices": dg.MetadataValue.json([list(d) for d in report.dirty]),
        "plan_id": report.plan_id, "honour_ms": report.honour_seconds * 1000,
        "depths": dg.MetadataValue.json({str(c.shard): c.depth for c in report.plan.choices}),
        "grad_example_steps": report.grad_example_steps,
    })
    return {"new": list(report.new), "dirty": [list(d) for d in report.dirty]}


@dg.job(description="Forget examples by id (config: ops.forget_examples.config.ids).", executor_def=dg.in_process_executor)
def forget():
    forget_examples()


# Light runs on the deletion path execute in one process: no step subprocess to start, so the champion
# moves sooner. Training runs keep the default multiprocess executor.
serve = dg.define_asset_job("serve", selection=["s3t_ensemble"], executor_def=dg.in_process_executor,
                            description="Record the serving plan and register it in MLflow (alias champion).")


def refresh_slices_job(slice_def: dg.PartitionsDefinition):
    return dg.define_asset_job("refresh_slices", selection=["slice_data"], partitions_def=slice_def,
                               executor_def=dg.in_process_executor,
                               description="Rewrite one (shard, slice) partition without its deleted examples.")

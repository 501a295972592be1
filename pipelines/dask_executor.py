"""Dagster's Dask executor (dagster-dask) with the two fixes S3T needs to share one cluster between runs.

`S3T_EXECUTOR=dask` (docs/scaling.md) runs each step on a Dask worker process, as `dagster_dask.dask_executor`
does, but:

1. Task keys carry the run id. Upstream (0.29.27) names a step's task `<job>.<step>`, so concurrent runs of one
   job on one cluster (the nightly schedule's runs, one per stale (shard, sequence)) share keys, and Dask
   treats them as one task: the second run gets the first run's step events, its own step never runs
   (dagster-io/dagster#21418).
2. The step's arguments travel opaque. Dask >= 2024.12 walks tuples in `Client.submit` arguments, and
   Dagster's records (the run's AssetKeys) refuse iteration: every asset run failed with "Iteration is not
   allowed on `@record` AssetKey" before a step started.

Clusters: `existing` (a scheduler address) or `local` (a distributed.LocalCluster of worker processes, one
thread each, closed when the run ends).
"""
from __future__ import annotations

import dagster as dg
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.errors import raise_execution_interrupts
from dagster._utils import iterate_with_context
from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements, query_on_dask_worker


class Opaque:
    """A value Dask passes through untouched (it is pickled whole, never parsed as a task)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def run_step(dependencies, payload: Opaque):
    """On a worker: one step of the run (`dependencies` only orders the futures)."""
    return query_on_dask_worker(dependencies, *payload.value)


class S3TDaskExecutor(DaskExecutor):
    def execute(self, plan_context, execution_plan):
        import dask.distributed

        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("Dask execution requires a persistent DagsterInstance (DAGSTER_HOME)")
        run = plan_context.dagster_run
        if self.cluster_type == "existing":
            cluster, owned = self.cluster_configuration["address"], None
        else:
            owned = cluster = dask.distributed.LocalCluster(**self.build_dict(plan_context.job_name))
        try:
            with dask.distributed.Client(cluster) as client:
                futures = {}
                for level in execution_plan.get_steps_to_execute_by_level():
                    for step in level:
                        deps = [futures[key] for inp in step.step_inputs for key in inp.dependency_keys]
                        payload = Opaque((plan_context.reconstructable_job, run, plan_context.run_config, [step.key],
                                          plan_context.instance.get_ref(), execution_plan.known_state))
                        futures[step.key] = client.submit(run_step, deps, payload, key=f"{run.run_id}.{step.key}",
                                                          resources=get_dask_resource_requirements(step.tags), pure=False)
                done = dask.distributed.as_completed(list(futures.values()), with_results=True)
                for _future, events in iterate_with_context(raise_execution_interrupts, done):
                    yield from events
        finally:
            if owned is not None:
                owned.close()


@dg.executor(
    name="dask",
    requirements=multiple_process_executor_requirements(),
    config_schema={"cluster": dg.Field(dg.Selector({
        "existing": dg.Field({"address": dg.StringSource}, description="Connect to an existing scheduler."),
        "local": dg.Field(dg.Permissive(), is_required=False,
                          description="distributed.LocalCluster arguments (n_workers, ...); one thread per worker."),
    }))},
)
def s3t_dask_executor(init_context):
    """Each step a Dask task on a worker process; see the module docstring for what differs from dagster-dask."""
    ((cluster_type, cluster_config),) = init_context.executor_config["cluster"].items()
    return S3TDaskExecutor(cluster_type, cluster_config)

"""The deletion sensor: new ledger requests -> re-materialize the affected slices (so Dagster marks exactly
the stage partitions that saw them stale) and record the ensemble with the stage staleness checks. The
champion already moved in the request's own run (the forget job or `s3t forget`): this path is off the
critical path. Follow-up runs carry the tag s3t/forget_run = the Dagster run(s) that made the request."""

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def build_deletion_sensor(refresh_slices, serve) -> dg.SensorDefinition:
    @dg.sensor(name="deletion_sensor", jobs=[refresh_slices, serve], minimum_interval_seconds=5,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="New deletion requests -> re-materialize the affected slices and record the served ensemble.")
    def deletion_sensor(context: dg.SensorEvaluationContext, s3t: S3TResource):
        if not s3t.exists():
            return dg.SkipReason("no ledger yet")
        seen = int(context.cursor or 0)
        total, cells, requests = s3t.engine(load_backbone=False, repair=False).deletions_after(seen)
        if total <= seen:
            return dg.SkipReason(f"no new deletion requests ({seen} handled)")
        tag = f"deletions-{seen}-{total}"
        tags = {"s3t/deletions": tag, **({"s3t/forget_run": ",".join(requests)[:250]} if requests else {})}
        run_requests = [dg.RunRequest(run_key=f"{tag}-ensemble", job_name=serve.name, tags=tags)]
        run_requests += [dg.RunRequest(run_key=f"{tag}-s{s}-j{j}", job_name=refresh_slices.name,
                                       partition_key=S3TPartitions.slice_partition(s, j), tags=tags)
                         for s, j in cells]
        return dg.SensorResult(run_requests=run_requests, cursor=str(total))

    return deletion_sensor

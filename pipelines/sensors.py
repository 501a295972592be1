"""The deletion sensor turns new ledger requests into slice_data runs and an ensemble refresh."""

import dagster as dg

from pipelines.partitions import S3TPartitions
from pipelines.resources import S3TResource


def build_deletion_sensor(refresh_slices, serve) -> dg.SensorDefinition:
    """The ensemble refresh is requested first: it alone moves the champion (the plan comes from the ledger)."""

    @dg.sensor(name="deletion_sensor", jobs=[refresh_slices, serve], minimum_interval_seconds=5,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="New deletion requests -> re-materialize the affected slices and the served ensemble.")
    def deletion_sensor(context: dg.SensorEvaluationContext, s3t: S3TResource):
        engine = s3t.engine(load_backbone=False)
        if not engine.ledger.exists():
            return dg.SkipReason("no ledger yet")
        dels = engine.ledger.deletions()
        seen = int(context.cursor or 0)
        if len(dels) <= seen:
            return dg.SkipReason(f"no new deletion requests ({seen} handled)")
        new = dels.iloc[seen:]
        cells = sorted({(int(r.shard), int(r.slice)) for r in new.itertuples() if r.split == "train"})
        tag = f"deletions-{seen}-{len(dels)}"
        requests = [dg.RunRequest(run_key=f"{tag}-ensemble", job_name=serve.name, tags={"s3t/deletions": tag})]
        requests += [dg.RunRequest(run_key=f"{tag}-s{s}-j{j}", job_name=refresh_slices.name,
                                   partition_key=S3TPartitions.slice_partition(s, j), tags={"s3t/deletions": tag})
                     for s, j in cells]
        return dg.SensorResult(run_requests=requests, cursor=str(len(dels)))

    return deletion_sensor

"""The plan the engine currently serves, as an asset with its shard depths as metadata."""
import os

import dagster as dg


class StateConfig(dg.Config):
    state_dir: str = os.environ.get("S3T_STATE", "s3t_state")


@dg.asset(description="Serving plan of an S3T state folder: longest valid prefix per shard.")
def served_plan(config: StateConfig) -> dg.MaterializeResult:
    from s3t_ops.engine import S3T

    engine = S3T.open(config.state_dir, progress=False)
    plan_id, plan = engine.serve()
    return dg.MaterializeResult(metadata={
        "plan_id": plan_id,
        "live_shards": len(plan.choices),
        "depths": dg.MetadataValue.json({str(c.shard): c.depth for c in plan.choices}),
    })

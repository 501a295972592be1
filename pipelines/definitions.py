"""Dagster code location: `dagster dev -w workspace.yaml`. Thin: each asset calls one engine operation."""
from __future__ import annotations

import json

import dagster as dg

from pipelines.assets.data import build_data_assets
from pipelines.assets.memorization import build_memorization_assets
from pipelines.assets.serving import build_serving_asset
from pipelines.assets.stages import build_stage_assets
from pipelines.checks import exactness_audit, slice_data_holds_no_deleted_id
from pipelines.jobs import forget, refresh_slices_job, serve
from pipelines.partitions import S3TPartitions
from pipelines.resources import MlflowResource, S3TResource
from pipelines.schedules import build_retrain_schedule
from pipelines.sensors import build_deletion_sensor
from pipelines.settings import PipelineSettings, load_settings
from s3t_ops.sequences import select_sequences


def build_definitions(settings: PipelineSettings) -> dg.Definitions:
    cfg = settings.cfg
    sequences = select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior)
    parts = S3TPartitions(cfg.shards, sequences)
    eager = settings.retrain_policy == "eager"
    examples, slice_data = build_data_assets(parts)
    stages = build_stage_assets(parts, dg.AutomationCondition.eager() if eager else None)
    ensemble = build_serving_asset(cfg.slices)
    refresh_slices = refresh_slices_job(parts.slice_def)
    config_json = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "state_dir"})
    return dg.Definitions(
        assets=[examples, slice_data, *stages, ensemble, *build_memorization_assets(cfg.slices)],
        asset_checks=[slice_data_holds_no_deleted_id, exactness_audit],
        jobs=[forget, serve, refresh_slices],
        sensors=[
            build_deletion_sensor(refresh_slices, serve),
            dg.AutomationConditionSensorDefinition("s3t_automation", target=dg.AssetSelection.all(),
                                                   default_status=dg.DefaultSensorStatus.RUNNING,
                                                   minimum_interval_seconds=15),
        ],
        schedules=[build_retrain_schedule(stages, settings.retrain_cron, running=not eager)],
        resources={
            "s3t": S3TResource(state_dir=str(cfg.state_dir), config_json=config_json),
            "mlflow": MlflowResource(tracking_uri=settings.tracking_uri, model_name=settings.model_name),
        },
    )


defs = build_definitions(load_settings())

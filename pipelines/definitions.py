"""Dagster code location `s3t`: `dagster dev -w workspace.yaml`. Thin: each asset calls one engine operation.

The training graph (data -> stages -> serving) is executable; the approximate-unlearning group is declared as
external asset specs produced by the `memorization` job (pipelines/assets/memorization.py), so "Materialize all"
(on any page) trains S3T and never the memorization models, which run only when asked.
"""
from __future__ import annotations

import json

import dagster as dg

from pipelines.assets.data import build_data_assets
from pipelines.assets.memorization import build_memorization_specs, memorization_job
from pipelines.assets.serving import build_serving_asset
from pipelines.assets.stages import build_stage_assets
from pipelines.checks import build_stage_checks, exactness_audit, slice_data_holds_no_deleted_id
from pipelines.jobs import find_examples, forget, refresh_slices_job, serve_job
from pipelines.partitions import S3TPartitions
from pipelines.resources import MlflowResource, S3TResource
from pipelines.schedules import build_retrain_schedule
from pipelines.sensors import build_deletion_sensor
from pipelines.settings import PipelineSettings, load_settings
from s3t_ops.sequences import select_sequences


def build_resources(settings: PipelineSettings) -> dict:
    cfg = settings.cfg
    config_json = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "state_dir"})
    return {"s3t": S3TResource(state_dir=str(cfg.state_dir), config_json=config_json),
            "mlflow": MlflowResource(tracking_uri=settings.tracking_uri, model_name=settings.model_name)}


def build_executor(settings: PipelineSettings) -> dg.ExecutorDefinition | None:
    """S3T_EXECUTOR (docs/scaling.md). None: Dagster's default (multiprocess; Launchpad may pick in_process)."""
    if settings.executor == "dask":
        from pipelines.dask_executor import s3t_dask_executor  # worker processes, one thread each: torch state per worker

        cluster = ({"existing": {"address": settings.dask_address}} if settings.dask_address
                   else {"local": {"n_workers": settings.dask_workers, "processes": True}})
        return s3t_dask_executor.configured({"cluster": cluster}, name="dask")
    if settings.executor == "k8s":
        from dagster_k8s import k8s_job_executor  # image/namespace from the K8sRunLauncher or the run's `execution` config

        return k8s_job_executor
    return None


def stage_op_tags(settings: PipelineSettings) -> dict | None:
    """Resource requests of each stage step's pod under the k8s executor."""
    if settings.executor != "k8s":
        return None
    requests = {"cpu": settings.k8s_cpu, "memory": settings.k8s_memory}
    return {"dagster-k8s/config": {"container_config": {"resources": {"requests": requests}}}}


def build_definitions(settings: PipelineSettings) -> dg.Definitions:
    cfg = settings.cfg
    sequences = select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior)
    parts = S3TPartitions(cfg.shards, sequences)
    eager = settings.retrain_policy == "eager"
    examples, slice_data = build_data_assets(parts)
    stages = build_stage_assets(parts, dg.AutomationCondition.eager() if eager else None, stage_op_tags(settings))
    ensemble = build_serving_asset(cfg.slices)
    stage_checks = build_stage_checks(cfg.slices)
    refresh_slices = refresh_slices_job(parts.slice_def)
    serve = serve_job(stage_checks)
    return dg.Definitions(
        assets=[examples, slice_data, *stages, ensemble, *build_memorization_specs(cfg.slices)],
        asset_checks=[slice_data_holds_no_deleted_id, exactness_audit, *stage_checks],
        jobs=[forget, find_examples, serve, refresh_slices, memorization_job],
        sensors=[
            build_deletion_sensor(refresh_slices, serve),
            dg.AutomationConditionSensorDefinition("s3t_automation", target=dg.AssetSelection.all() - dg.AssetSelection.groups("memorization"),
                                                   default_status=dg.DefaultSensorStatus.RUNNING,
                                                   minimum_interval_seconds=15),
        ],
        # the nightly policy has a schedule; the eager one retrains through automation and lists no schedule
        schedules=[] if eager else [build_retrain_schedule(stages, settings.retrain_cron, settings.retrain_chains,
                                                                  settings.retrain_budget)],
        resources=build_resources(settings),
        executor=build_executor(settings),
    )


defs = build_definitions(load_settings())

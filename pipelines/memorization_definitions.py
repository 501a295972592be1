"""Dagster code location `s3t-memorization`: approximate unlearning (RUM with memorization proxies).

Its assets train extra models, so they live apart from the training graph: "Materialize all" in the `s3t`
location never runs them; here they run when asked (Launchpad config in pipelines/assets/memorization.py).
They read the same state folder through the same engine, and depend on `slice_data` and the stages of
the `s3t` location (shown across locations in the global asset graph).
"""
from __future__ import annotations

import dagster as dg

from pipelines.assets.memorization import build_memorization_assets
from pipelines.definitions import build_resources
from pipelines.settings import PipelineSettings, load_settings


def build_memorization_definitions(settings: PipelineSettings) -> dg.Definitions:
    return dg.Definitions(assets=build_memorization_assets(settings.cfg.slices), resources=build_resources(settings))


defs = build_memorization_definitions(load_settings())

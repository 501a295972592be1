"""Dagster code location. The partitioned asset graph grows here (see DESIGN.md); for now it loads
and exposes the engine's serving plan as one asset so `dagster dev -w workspace.yaml` starts."""
import dagster as dg

from pipelines.assets.serving import served_plan

defs = dg.Definitions(assets=[served_plan])

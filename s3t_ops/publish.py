"""Where the rooms report what happened: a trained stage, a served plan, erasure; which registry that is.

Training, serving, forgetting and repair call the state's publisher, so the CLI, the Dagster assets and the demo
leave the same registry behind. This module is the interface: `Publisher` itself does nothing (for tests and
benchmarks that do not need a registry); registry.py's `MlflowPublisher` is the default (one MLflow run per trained
stage, a registered model version per served plan with alias `champion`, erasure of versions and runs that hold a
deleted example), and registry.py picks the one a state records (`default_publisher`).

A publisher receives data, never the engine: what registering a plan needs (`PlanBundle`) and what finding the
registry's copies of deleted examples needs (`RegistryErasure`) are built by the rooms that call it.

Which registry a state publishes to is fixed when the state is created and recorded in its ledger (`registry` in the
meta table): every later door publishes there too.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL_NAME = "s3t-ensemble"
DEFAULT_EXPERIMENT = "s3t"
KINDS = ("mlflow", "none")


class PublishError(RuntimeError):
    """The registry could not be updated; the ledger is consistent and the next command retries. `report`: what
    the command did before (e.g. the ForgetReport of a deletion honoured and erased locally)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class ForeignModel(RuntimeError):
    """The registered model name belongs to another S3T state on the same MLflow store."""


@dataclass
class PlanBundle:
    """What registering a plan needs of the state, and nothing else of it (serving.bundle builds it)."""

    config: dict
    label_names: list[str]
    deleted: list[str]  # keyed tombstones of every deletion the plan honours, sorted
    read_checkpoint: Callable[[str], bytes]  # key -> the file's bytes, checked against the ledger's sha256
    backbone_fingerprint: str
    tags: dict[str, str]
    shards: int


@dataclass
class RegistryErasure:
    """What finding the registry's copies of deleted examples needs of the state (erasure.registry_erasure builds it)."""

    plan_of: Callable[[int], dict | None]  # plan id -> its record in the ledger
    tainted: Callable[[dict], bool]  # a plan whose checkpoints' lineage holds a deleted example
    stale_keys: set[str]  # checkpoints purged because they trained on a deleted example
    artifact_alive: Callable[[str], bool]  # a named artifact (e.g. a memorization report) is still whole
    artifact_tags: tuple[str, ...] = ()  # run tags that name such an artifact: runs naming a removed one are erased


class Publisher:
    """Does nothing: the ledger alone is the record."""

    registers = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "none"}

    def bind(self, state_id: str) -> None:
        """The id of the state it publishes for (a new state learns its id after its publisher was made)."""

    def stage_trained(self, row: dict, config: dict, tags: dict[str, str]) -> None:
        pass

    def plan_served(self, plan_id: int, record: dict, bundle: PlanBundle) -> int | None:
        return None

    def erase(self, view: RegistryErasure) -> list[str]:
        """Remove what the registry holds of deleted examples; returns what was removed."""
        return []

    def champion(self) -> dict | None:
        return None

    def damaged_copy(self) -> list[str]:
        """Checkpoints whose copy in the registry's champion is damaged ([]: none, or no registry)."""
        return []

    def republish(self, plan_id: int, record: dict, bundle: PlanBundle) -> int | None:
        """Register the plan again as a new version (the champion's copy was damaged) and drop the damaged one."""
        return None

    def rekey(self, kmap: dict[str, str], rows: list[dict]) -> None:
        """Bring the registry in line with re-derived checkpoint keys (a ledger migration)."""


def user_tracking_uri(env: dict[str, str] | None = None) -> str | None:
    """MLFLOW_TRACKING_URI as the user's environment sets it. `mlflow.set_tracking_uri` writes the variable too, in
    this process (a user loading the champion of some store, a test): a value MLflow holds as the URI it was told
    in-process is that call's, not the user's choice of registry for a state."""
    import sys

    value = ((os.environ if env is None else env).get("MLFLOW_TRACKING_URI")) or None
    told = getattr(sys.modules.get("mlflow.tracking._tracking_service.utils"), "_tracking_uri", None)
    return None if env is None and value is not None and told == value else value


def settings_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """S3T_REGISTRY (mlflow | none), MLFLOW_TRACKING_URI, S3T_MODEL_NAME: read when a state is created."""
    values = os.environ if env is None else env
    kind = values.get("S3T_REGISTRY", "mlflow")
    if kind not in KINDS:
        raise ValueError(f"S3T_REGISTRY must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return {"kind": "none"}
    return {"kind": "mlflow", "tracking_uri": user_tracking_uri(env),
            "model_name": values.get("S3T_MODEL_NAME") or DEFAULT_MODEL_NAME, "experiment": DEFAULT_EXPERIMENT}

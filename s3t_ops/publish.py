"""Where the engine reports what happened: a trained stage, a served plan, invalidated stages, erasure.

The engine calls its publisher from the lifecycle (`fit`, `forget`, `retrain`, `repair`), so the CLI,
the Dagster assets and the demo leave the same registry behind. `MlflowPublisher` is the default:
one MLflow run per trained stage, a registered model version per served plan with alias `champion`,
and erasure of versions and runs that hold a deleted example. `Publisher` itself does nothing (for
tests and benchmarks that do not need a registry).

Which registry a state publishes to is fixed when the state is created and recorded in its ledger
(`registry` in the meta table): every later door publishes there too.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3t_ops.engine import S3T
    from s3t_ops.registry import Tracker

# read at import, before mlflow is imported: mlflow.set_tracking_uri() writes this variable in-process
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None
DEFAULT_MODEL_NAME = "s3t-ensemble"
DEFAULT_EXPERIMENT = "s3t"
KINDS = ("mlflow", "none")


class PublishError(RuntimeError):
    """The registry could not be updated; the ledger is consistent and the next command retries. `report`: what
    the command did before (e.g. the ForgetReport of a deletion honoured and erased locally)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class Publisher:
    """Does nothing: the ledger alone is the record."""

    registers = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "none"}

    def stage_trained(self, engine: "S3T", row: dict) -> None:
        pass

    def plan_served(self, engine: "S3T", plan_id: int, record: dict) -> int | None:
        return None

    def erase(self, engine: "S3T") -> list[str]:
        """Remove what the registry holds of deleted examples; returns what was removed."""
        return []

    def champion(self) -> dict | None:
        return None

    def damaged_copy(self) -> list[str]:
        """Checkpoints whose copy in the registry's champion is damaged ([]: none, or no registry)."""
        return []

    def republish(self, engine: "S3T", plan_id: int, record: dict) -> int | None:
        """Register the plan again as a new version (the champion's copy was damaged) and drop the damaged one."""
        return None

    def rekey(self, engine: "S3T", kmap: dict[str, str]) -> None:
        """Bring the registry in line with re-derived checkpoint keys (a ledger migration)."""


class MlflowPublisher(Publisher):
    """MLflow tracking + model registry (a SQLite store in the state folder unless a URI is given)."""

    registers = True

    def __init__(self, state_dir, tracking_uri: str | None = None, model_name: str = DEFAULT_MODEL_NAME,
                 experiment: str = DEFAULT_EXPERIMENT, state_id: str | None = None):
        self.state_dir = state_dir
        self.tracking_uri = tracking_uri or None
        self.model_name = model_name
        self.experiment = experiment
        self.state_id = state_id  # set by the engine: which state's runs and versions these are
        self._tracker: "Tracker | None" = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": "mlflow", "tracking_uri": self.tracking_uri, "model_name": self.model_name, "experiment": self.experiment}

    @property
    def tracker(self) -> "Tracker":
        with self._lock:
            if self._tracker is None:
                from s3t_ops.ledger import Ledger
                from s3t_ops.registry import Tracker, default_artifact_root, default_tracking_uri

                # under the ledger's lock: processes that open a state's store for the first time at once (parallel
                # Dagster steps) never race on creating its schema or experiment
                with Ledger(Path(self.state_dir) / "ledger.duckdb").locked():
                    self._tracker = self._call("opening the store", Tracker, self.tracking_uri or default_tracking_uri(self.state_dir),
                                               self.experiment, self.model_name, default_artifact_root(self.state_dir), self.state_id)
            return self._tracker


    def _call(self, what: str, fn, *args):
        from s3t_ops.registry import ForeignModelError

        try:
            return fn(*args)
        except PublishError:
            raise
        except ForeignModelError as exc:
            raise PublishError(str(exc)) from None
        except Exception as exc:  # MLflow raises many types (HTTP, SQL, IO)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PublishError(f"MLflow registry at {self.tracking_uri or 'the state folder'}: {what} failed ({first}); "
                               "the ledger is consistent and the next s3t command retries") from exc

    def stage_trained(self, engine: "S3T", row: dict) -> None:
        self._call("logging a stage run", self.tracker.log_stage, row, engine.cfg.to_dict(), engine.tags)

    def plan_served(self, engine: "S3T", plan_id: int, record: dict) -> int | None:
        return self._call("registering the served plan", self.tracker.publish_plan, engine, plan_id, record)

    def erase(self, engine: "S3T") -> list[str]:
        return self._call("erasing versions and runs", self.tracker.erase, engine)

    def champion(self) -> dict | None:
        return self.tracker.champion()

    def damaged_copy(self) -> list[str]:
        return self._call("checking the champion's files", self.tracker.champion_copy_damaged)

    def republish(self, engine: "S3T", plan_id: int, record: dict) -> int | None:
        def run() -> int:
            old = self.tracker.champion()
            version = self.tracker.publish_plan(engine, plan_id, record, new_version=True)
            if old is not None and old["version"] != version:
                self.tracker.delete_version(old["version"], old["run_id"])
            return version

        return self._call("re-publishing the plan", run)

    def rekey(self, engine: "S3T", kmap: dict[str, str]) -> None:
        if engine.served() is not None:
            engine.serve(publish=False)  # the plan as recorded today (with its files' sha256)
        latest = engine.served()
        if latest is not None:
            engine.ledger.mark_published(latest[0], self.republish(engine, *latest))
        self._call("re-keying stage runs", self.tracker.rekey, engine, kmap)


def publisher_from(settings: dict[str, Any], state_dir, state_id: str | None = None) -> Publisher:
    kind = settings.get("kind", "mlflow")
    if kind == "none":
        return Publisher()
    if kind != "mlflow":
        raise ValueError(f"registry kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return MlflowPublisher(state_dir, settings.get("tracking_uri"), settings.get("model_name") or DEFAULT_MODEL_NAME,
                           settings.get("experiment") or DEFAULT_EXPERIMENT, state_id)


def settings_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """S3T_REGISTRY (mlflow | none), MLFLOW_TRACKING_URI, S3T_MODEL_NAME: used when a state is created."""
    kind = (os.environ if env is None else env).get("S3T_REGISTRY", "mlflow")
    if kind not in KINDS:
        raise ValueError(f"S3T_REGISTRY must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return {"kind": "none"}
    uri = (env.get("MLFLOW_TRACKING_URI") or None) if env is not None else _ENV_TRACKING_URI
    return {"kind": "mlflow", "tracking_uri": uri,
            "model_name": (os.environ if env is None else env).get("S3T_MODEL_NAME") or DEFAULT_MODEL_NAME,
            "experiment": DEFAULT_EXPERIMENT}


def default_publisher(engine: "S3T") -> Publisher:
    """The registry recorded in the state's ledger (fixed at creation). An MLFLOW_TRACKING_URI that
    names another store is an error: two doors must not publish to two registries."""
    recorded = engine.ledger.get_meta("registry")
    if recorded is None:
        recorded = settings_from_env()
        engine.ledger.set_meta("registry", recorded)
    env_uri = _ENV_TRACKING_URI
    if recorded.get("kind") == "mlflow" and env_uri and env_uri != recorded.get("tracking_uri"):
        raise ValueError(f"state {engine.root} publishes to {recorded.get('tracking_uri') or 'its own MLflow store'} "
                         f"(fixed when it was created), but MLFLOW_TRACKING_URI is {env_uri}; unset it")
    return publisher_from(recorded, engine.root, engine.ledger.get_meta("state_id"))

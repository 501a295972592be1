"""The state's registry: which one it publishes to (recorded at creation), and the MLflow publisher, the default.

The registry is a serving interface: `mlflow.pyfunc.load_model("models:/<name>@champion")` gives a model whose
`predict(pd.DataFrame({"text": [...]}))` returns labels and probabilities (pyfunc_model.py; champion.py loads it). A
version is registered on every plan change; its tags name the deletion requests it honours (keyed tombstones), and
once a newer version is champion, versions whose checkpoints saw a deleted example are deleted with their runs'
artifacts (erasure reaches the registry too). The MLflow client work is tracker.py's.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from s3t_ops.publish import (DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, KINDS, ForeignModel, PlanBundle, Publisher, PublishError,
                             RegistryErasure, settings_from_env, user_tracking_uri)
from s3t_ops.tracker import Tracker, default_artifact_root, default_tracking_uri

# --- which registry a state publishes to --------------------------------------------------------------
def publisher_from(settings: dict[str, Any], state_dir, state_id: str | None = None) -> Publisher:
    kind = settings.get("kind", "mlflow")
    if kind == "none":
        return Publisher()
    if kind != "mlflow":
        raise ValueError(f"registry kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return MlflowPublisher(state_dir, settings.get("tracking_uri"), settings.get("model_name") or DEFAULT_MODEL_NAME,
                           settings.get("experiment") or DEFAULT_EXPERIMENT, state_id)


def default_publisher(recorded: dict | None, root: Path, state_id: str | None) -> Publisher:
    """The registry recorded in the state's ledger (fixed at creation). An MLFLOW_TRACKING_URI that names another
    store is an error: two doors must not publish to two registries. (The state's own store, named by its URI, is
    the same store: `mlflow.set_tracking_uri` on it, as a user loading the champion does, is fine.)"""
    recorded = recorded if recorded is not None else settings_from_env()
    env_uri = user_tracking_uri()
    if recorded.get("kind") == "mlflow" and env_uri and env_uri != (recorded.get("tracking_uri") or default_tracking_uri(root)):
        raise ValueError(f"state {root} publishes to {recorded.get('tracking_uri') or 'its own MLflow store'} "
                         f"(fixed when it was created), but MLFLOW_TRACKING_URI is {env_uri}; unset it")
    return publisher_from(recorded, root, state_id)


def prepare_registry(settings: dict, folder: Path, final_root: Path, state_id: str) -> None:
    """At creation: the state's own MLflow store is created in `folder` with its schema migrated (once, here: never
    by parallel first users later), unless the final folder already holds one (a server started first); with any
    store, the registered model name is checked to be free or this state's (ForeignModel) before anything else is
    written."""
    if settings.get("kind") != "mlflow":
        return
    uri = settings.get("tracking_uri")
    if not uri:
        db = final_root / "mlflow.db" if (final_root / "mlflow.db").exists() else folder / "mlflow.db"
        uri = f"sqlite:///{db}"
    try:
        Tracker(uri, settings.get("experiment") or DEFAULT_EXPERIMENT, settings.get("model_name") or DEFAULT_MODEL_NAME,
                default_artifact_root(final_root), state_id).check_owner()
    except ForeignModel:
        raise
    except Exception as exc:  # MLflow raises many types (HTTP, SQL, IO)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"MLflow registry at {uri}: creating the state's store failed ({first})") from exc


class MlflowPublisher(Publisher):
    """MLflow tracking + model registry (a SQLite store in the state folder unless a URI is given)."""

    registers = True

    def __init__(self, state_dir, tracking_uri: str | None = None, model_name: str = DEFAULT_MODEL_NAME,
                 experiment: str = DEFAULT_EXPERIMENT, state_id: str | None = None):
        self.state_dir = state_dir
        self.tracking_uri = tracking_uri or None
        self.model_name = model_name
        self.experiment = experiment
        self.state_id = state_id  # which state's runs and versions these are
        self._tracker: "Tracker | None" = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": "mlflow", "tracking_uri": self.tracking_uri, "model_name": self.model_name, "experiment": self.experiment}

    def bind(self, state_id: str) -> None:
        self.state_id = state_id

    @property
    def tracker(self) -> "Tracker":
        with self._lock:
            if self._tracker is None:
                from s3t_ops.ledger import Ledger

                # under the ledger's lock: processes that open a state's store for the first time at once (parallel
                # Dagster steps) never race on creating its experiment
                with Ledger(Path(self.state_dir) / "ledger.duckdb").locked():
                    self._tracker = self._call("opening the store", Tracker, self.tracking_uri or default_tracking_uri(self.state_dir),
                                               self.experiment, self.model_name, default_artifact_root(self.state_dir), self.state_id)
            return self._tracker

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except PublishError:
            raise
        except ForeignModel as exc:
            raise PublishError(str(exc)) from None
        except Exception as exc:  # MLflow raises many types (HTTP, SQL, IO)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PublishError(f"MLflow registry at {self.tracking_uri or 'the state folder'}: {what} failed ({first}); "
                               "the ledger is consistent and the next s3t command retries") from exc

    def stage_trained(self, row: dict, config: dict, tags: dict[str, str]) -> None:
        self._call("logging a stage run", self.tracker.log_stage, row, config, tags)

    def plan_served(self, plan_id: int, record: dict, bundle: PlanBundle) -> int | None:
        return self._call("registering the served plan", self.tracker.publish_plan, plan_id, record, bundle)

    def erase(self, view: RegistryErasure) -> list[str]:
        return self._call("erasing versions and runs", self.tracker.erase, view)

    def champion(self) -> dict | None:
        return self.tracker.champion()

    def damaged_copy(self) -> list[str]:
        return self._call("checking the champion's files", self.tracker.champion_copy_damaged)

    def republish(self, plan_id: int, record: dict, bundle: PlanBundle) -> int | None:
        def run() -> int:
            old = self.tracker.champion()
            version = self.tracker.publish_plan(plan_id, record, bundle, new_version=True)
            if old is not None and old["version"] != version:
                self.tracker.delete_version(old["version"], old["run_id"])
            return version

        return self._call("re-publishing the plan", run)

    def rekey(self, kmap: dict[str, str], rows: list[dict]) -> None:
        self._call("re-keying stage runs", self.tracker.rekey, kmap, rows)

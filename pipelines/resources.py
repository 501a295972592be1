"""Our own small resources (not dagster-mlflow / dagster-duckdb-pandas, which pin pandas<3)."""
from __future__ import annotations

import json
from functools import lru_cache

import dagster as dg

from s3t_ops.config import S3TConfig


@lru_cache(maxsize=4)
def _backbone(config_json: str):
    """One backbone per process and config: loading it costs seconds, runs may reuse it."""
    from s3t_ops.backbone import Backbone

    return Backbone(S3TConfig.from_dict(json.loads(config_json)))


class MlflowResource(dg.ConfigurableResource):
    """The registry a NEW state publishes to (recorded in its ledger; later every door publishes there).
    Default: a SQLite store inside the state folder."""

    tracking_uri: str = ""
    model_name: str = "s3t-ensemble"
    experiment: str = "s3t"

    def publisher(self, state_dir: str):
        from s3t_ops.registry import MlflowPublisher

        return MlflowPublisher(state_dir, self.tracking_uri or None, self.model_name, self.experiment)

    def tracker(self, engine, experiment: str | None = None):
        from s3t_ops.tracker import Tracker, default_artifact_root, default_tracking_uri

        state_dir = engine.root
        uri = self.tracking_uri or default_tracking_uri(state_dir)
        return Tracker(uri, experiment=experiment or self.experiment, model_name=self.model_name, state_id=engine.ledger.get_meta("state_id"),
                       artifact_root=default_artifact_root(state_dir))


class S3TResource(dg.ConfigurableResource):
    """The engine over one state folder: opened (and repaired) per call, with a cached backbone per process."""

    state_dir: str
    config_json: str  # S3TConfig.to_dict() as JSON: used to create the state on first ingest

    def config(self) -> S3TConfig:
        data = json.loads(self.config_json)
        data["state_dir"] = self.state_dir
        return S3TConfig.from_dict(data)

    def exists(self) -> bool:
        from pathlib import Path

        return (Path(self.state_dir) / "config.json").is_file()

    def engine(self, load_backbone: bool = True, run_id: str | None = None, repair: bool = True):
        """The state's engine (it publishes to the registry recorded at creation); `run_id` tags what it registers.
        Sensors, schedules and checks only read: they open without repairing (a run repairs)."""
        from s3t_ops.engine import S3T, StateError

        if not self.exists():
            raise StateError(f"no S3T state in {self.state_dir} yet: materialize the `examples` asset first")
        engine = S3T.open(self.state_dir, backbone=self._backbone() if load_backbone else None, progress=False, repair=repair)
        if run_id:
            engine.tags = {"dagster_run_id": run_id}
        return engine

    def open_or_create(self, source: str | None, publisher, run_id: str | None = None):
        """The state's engine; ingests `source` into a new state first (`publisher` is then recorded as its registry)."""
        from s3t_ops.engine import S3T

        engine = S3T.open_or_create(self.config(), source, publisher=None if self.exists() else publisher,
                                    backbone=self._backbone(), progress=False)
        if run_id:
            engine.tags = {"dagster_run_id": run_id}
        return engine

    def _backbone(self):
        cfg = self.config()
        return _backbone(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "state_dir"}, sort_keys=True))

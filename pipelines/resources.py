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


class S3TResource(dg.ConfigurableResource):
    """The engine over one state folder. A fresh engine per call, a cached backbone per process."""

    state_dir: str
    config_json: str  # S3TConfig.to_dict() as JSON: used to create the state on first ingest

    def config(self) -> S3TConfig:
        data = json.loads(self.config_json)
        data["state_dir"] = self.state_dir
        return S3TConfig.from_dict(data)

    def engine(self, load_backbone: bool = True):
        from pathlib import Path

        from s3t_ops.engine import S3T

        cfg = self.config()
        key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "state_dir"}, sort_keys=True)
        backbone = _backbone(key) if load_backbone else None
        if (Path(self.state_dir) / "config.json").is_file():
            return S3T.open(self.state_dir, backbone=backbone, progress=False)
        return S3T(cfg, backbone=backbone, progress=False)


class MlflowResource(dg.ConfigurableResource):
    """Tracking and the model registry; the default is a SQLite store inside the state folder."""

    tracking_uri: str = ""
    model_name: str = "s3t-ensemble"
    experiment: str = "s3t"

    def tracker(self, state_dir: str, experiment: str | None = None):
        from s3t_ops.registry import Tracker, default_artifact_root, default_tracking_uri

        uri = self.tracking_uri or default_tracking_uri(state_dir)
        return Tracker(uri, experiment=experiment or self.experiment, model_name=self.model_name,
                       artifact_root=default_artifact_root(state_dir))

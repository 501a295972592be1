"""Where the pipeline's config comes from: partitions are static, so they are fixed when definitions load.

S3T_STATE (default ./s3t_state) names the state folder; its config.json wins when it exists, else
S3T_CONFIG (a JSON file of S3TConfig fields) or the defaults. S3T_RETRAIN picks the retraining
policy for stale stages: "nightly" (default; cron S3T_RETRAIN_CRON, "0 2 * * *") or "eager".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from s3t_ops.config import S3TConfig

POLICIES = ("nightly", "eager")


@dataclass(frozen=True)
class PipelineSettings:
    cfg: S3TConfig
    retrain_policy: str = "nightly"
    retrain_cron: str = "0 2 * * *"
    model_name: str = "s3t-ensemble"
    tracking_uri: str = ""  # empty: sqlite in the state folder

    def __post_init__(self) -> None:
        if self.retrain_policy not in POLICIES:
            raise ValueError(f"S3T_RETRAIN must be one of {', '.join(POLICIES)}, got {self.retrain_policy!r}")


def load_settings(env: dict[str, str] | None = None) -> PipelineSettings:
    env = dict(os.environ if env is None else env)
    state = Path(env.get("S3T_STATE", "s3t_state"))
    if (state / "config.json").is_file():
        data = json.loads((state / "config.json").read_text())
    elif env.get("S3T_CONFIG"):
        data = json.loads(Path(env["S3T_CONFIG"]).read_text())
    else:
        data = {}
    data["state_dir"] = str(state)
    return PipelineSettings(
        cfg=S3TConfig.from_dict(data),
        retrain_policy=env.get("S3T_RETRAIN", "nightly"),
        retrain_cron=env.get("S3T_RETRAIN_CRON", "0 2 * * *"),
        model_name=env.get("S3T_MODEL_NAME", "s3t-ensemble"),
        tracking_uri=env.get("MLFLOW_TRACKING_URI", ""),
    )

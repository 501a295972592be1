"""Where the pipeline's config comes from: partitions are static, so they are fixed when definitions load.

S3T_STATE (default ./s3t_state) names the state folder; its config.json wins when it exists, else
S3T_CONFIG (a JSON file of S3TConfig fields) or the defaults. S3T_STORAGE_URL (an fsspec URL, e.g.
s3://bucket/prefix) puts a new state's trunk cache, slice files and checkpoints there (docs/scaling.md,
"Storage"); for an existing state it must name the URL the state was created with. S3T_RETRAIN picks the retraining
policy for stale stages: "nightly" (default; cron S3T_RETRAIN_CRON, "0 2 * * *") or "eager". At each nightly tick
S3T_RETRAIN_CHAINS ("all", default, or "cheapest": per shard the sequence cheapest to bring back to full depth) and
S3T_RETRAIN_BUDGET (example-steps per tick; empty: no cap) pick which stale chains retrain, as `s3t train --policy`
and `--budget-steps` do; the others wait for a later tick while the planner serves their best valid prefix.
S3T_EXECUTOR picks Dagster's executor for asset runs (docs/scaling.md): "multiprocess" (default), "dask"
(S3T_DASK_ADDRESS: an existing scheduler; else a local cluster of S3T_DASK_WORKERS worker processes) or
"k8s" (one pod per step; stage steps request S3T_K8S_CPU and S3T_K8S_MEMORY).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from s3t_ops.config import S3TConfig
from s3t_ops.policy import POLICIES as CHAIN_POLICIES

POLICIES = ("nightly", "eager")
EXECUTORS = ("multiprocess", "dask", "k8s")


@dataclass(frozen=True)
class PipelineSettings:
    cfg: S3TConfig
    retrain_policy: str = "nightly"
    retrain_cron: str = "0 2 * * *"
    retrain_chains: str = "all"  # which stale chains a nightly tick retrains (s3t_ops/policy.py)
    retrain_budget: int | None = None  # example-steps a nightly tick may spend; None: no cap
    model_name: str = "s3t-ensemble"
    tracking_uri: str = ""  # empty: sqlite in the state folder
    executor: str = "multiprocess"
    dask_address: str = ""  # empty: a local Dask cluster per run
    dask_workers: int = 2  # worker processes of that local cluster (one thread each)
    k8s_cpu: str = "1"  # Kubernetes requests of each stage step's pod
    k8s_memory: str = "4Gi"

    def __post_init__(self) -> None:
        if self.retrain_policy not in POLICIES:
            raise ValueError(f"S3T_RETRAIN must be one of {', '.join(POLICIES)}, got {self.retrain_policy!r}")
        if self.retrain_chains not in CHAIN_POLICIES:
            raise ValueError(f"S3T_RETRAIN_CHAINS must be one of {', '.join(CHAIN_POLICIES)}, got {self.retrain_chains!r}")
        if self.retrain_budget is not None and self.retrain_budget < 0:
            raise ValueError(f"S3T_RETRAIN_BUDGET must be >= 0 example-steps, got {self.retrain_budget}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"S3T_EXECUTOR must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.dask_workers < 1:
            raise ValueError(f"S3T_DASK_WORKERS must be at least 1, got {self.dask_workers}")


def load_settings(env: dict[str, str] | None = None) -> PipelineSettings:
    from s3t_ops.publish import user_tracking_uri

    tracking_uri = user_tracking_uri(env) or ""
    env = dict(os.environ if env is None else env)
    state = Path(env.get("S3T_STATE", "s3t_state"))
    saved = (state / "config.json").is_file()
    if saved:
        data = json.loads((state / "config.json").read_text())
    elif env.get("S3T_CONFIG"):
        data = json.loads(Path(env["S3T_CONFIG"]).read_text())
    else:
        data = {}
    data["state_dir"] = str(state)
    url = env.get("S3T_STORAGE_URL") or None
    if url is not None:
        if (state / "config.json").is_file() and data.get("storage_url") != url:
            raise ValueError(f"S3T_STORAGE_URL={url} differs from the storage_url={data.get('storage_url')} the state "
                             f"{state} was created with; storage is fixed when a state is created")
        data["storage_url"] = url
    return PipelineSettings(
        cfg=S3TConfig.from_dict(data, saved=saved),  # a new state takes today's defaults, as `s3t train` does
        retrain_policy=env.get("S3T_RETRAIN", "nightly"),
        retrain_cron=env.get("S3T_RETRAIN_CRON", "0 2 * * *"),
        retrain_chains=env.get("S3T_RETRAIN_CHAINS", "all"),
        retrain_budget=_int(env, "S3T_RETRAIN_BUDGET", None) if env.get("S3T_RETRAIN_BUDGET", "") != "" else None,
        model_name=env.get("S3T_MODEL_NAME", "s3t-ensemble"),
        tracking_uri=tracking_uri,
        executor=env.get("S3T_EXECUTOR", "multiprocess"),
        dask_address=env.get("S3T_DASK_ADDRESS", ""),
        dask_workers=_int(env, "S3T_DASK_WORKERS", 2),
        k8s_cpu=env.get("S3T_K8S_CPU", "1"),
        k8s_memory=env.get("S3T_K8S_MEMORY", "4Gi"),
    )


def _int(env: dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {env[name]!r}") from None

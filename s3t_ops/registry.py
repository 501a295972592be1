"""MLflow: one run per trained stage, the served ensemble as a registered pyfunc model with alias `champion`.

The registry is the serving interface: `mlflow.pyfunc.load_model("models:/<name>@champion")` gives a
model whose `predict(pd.DataFrame({"text": [...]}))` returns labels and probabilities. A version is
registered on every plan change; its tags name the deletion requests it honours, and once a newer
version is champion, versions whose checkpoints saw a deleted example are deleted with their runs'
artifacts (erasure reaches the registry too).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # per-file bars drown the pipeline's logs

with warnings.catch_warnings():  # mlflow's own pyfunc classes nag about type hints on import
    warnings.simplefilter("ignore", UserWarning)
    import mlflow
    import mlflow.pyfunc

CHAMPION = "champion"
MAX_TAG_CHARS = 4000  # well under MLflow's tag value limit; longer id lists go to an artifact only


def default_tracking_uri(state_dir: str | Path) -> str:
    return f"sqlite:///{(Path(state_dir) / 'mlflow.db').resolve()}"


def default_artifact_root(state_dir: str | Path) -> str:
    return str((Path(state_dir) / "mlartifacts").resolve())


def plan_digest(record: dict) -> str:
    """Identity of a plan for the registry: which checkpoints serve which shard."""
    return hashlib.sha256(json.dumps(record["checkpoints"], sort_keys=True).encode()).hexdigest()[:24]


with warnings.catch_warnings():  # mlflow nags about type hints at class creation; inputs are checked below
    warnings.simplefilter("ignore", UserWarning)

    class S3TEnsembleModel(mlflow.pyfunc.PythonModel):
        """Pyfunc body: the plan's checkpoints on the configured backbone, shared-trunk inference."""

        def load_context(self, context) -> None:
            from safetensors.torch import load_file

            from s3t_ops.backbone import Backbone
            from s3t_ops.config import S3TConfig
            from s3t_ops.ensemble import Ensemble, ShardModel

            meta = json.loads(Path(context.artifacts["meta"]).read_text())
            record = json.loads(Path(context.artifacts["plan"]).read_text())
            ckpt_dir = Path(context.artifacts["checkpoints"])
            cfg = S3TConfig.from_dict({**meta["config"], "state_dir": tempfile.gettempdir()})
            self.label_names = list(meta["label_names"])
            backbone = Backbone(cfg)
            models = [ShardModel(int(s), len(keys), [load_file(str(ckpt_dir / f"{k}.safetensors")) for k in keys])
                      for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]
            self.ensemble = Ensemble(backbone, models, len(self.label_names))

        def predict(self, context, model_input, params=None):
            if isinstance(model_input, pd.DataFrame):
                if "text" not in model_input.columns:
                    raise ValueError("input needs a `text` column")
                texts = model_input["text"].astype(str).tolist()
            else:
                texts = [str(t) for t in model_input]
            labels, probs = self.ensemble.predict(texts)
            out = pd.DataFrame({"label": [self.label_names[i] for i in labels.tolist()]})
            for j, name in enumerate(self.label_names):
                out[f"prob_{name}"] = probs[:, j].double().numpy()
            return out


class Tracker:
    """Tracking + registry over one MLflow store (a SQLite file by default, or an `mlflow server`)."""

    def __init__(self, tracking_uri: str, experiment: str = "s3t", model_name: str = "s3t-ensemble",
                 artifact_root: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.model_name = model_name
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # a local store keeps artifacts next to it; a server decides (--artifacts-destination)
            location = None if tracking_uri.startswith("http") or artifact_root is None else Path(artifact_root).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created concurrently by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # --- stage runs -------------------------------------------------------------------------
    def log_stage(self, row: dict, config: dict, losses: list[float], accuracies: list[float],
                  tags: dict[str, str] | None = None) -> str:
        """One run per trained stage: params, per-epoch metrics, lineage tags."""
        from mlflow.entities import Metric, Param, RunTag

        run_tags = {"s3t.kind": "stage", "s3t.shard": row["shard"], "s3t.stage": row["stage"],
                    "s3t.prefix": row["prefix"], "s3t.slice": row["slice"], "s3t.slice_version": row["slice_version"],
                    "s3t.checkpoint_key": row["key"], "s3t.parent_key": row.get("parent_key") or "",
                    **(row.get("lineage_tags") or {}), **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=f"stage{row['stage']}-s{row['shard']}-p{row['prefix']}",
                                     tags={k: str(v) for k, v in run_tags.items()})
        params = {k: v for k, v in config.items() if k != "state_dir"}
        params.update(shard=row["shard"], stage=row["stage"], prefix=row["prefix"], n_train=row["n_train"])
        metrics = [Metric("train_loss", float(v), 0, e) for e, v in enumerate(losses, start=1)]
        metrics += [Metric("train_accuracy", float(v), 0, e) for e, v in enumerate(accuracies, start=1)]
        for name in ("val_acc", "seconds", "grad_example_steps"):
            if row.get(name) is not None:
                metrics.append(Metric(name, float(row[name]), 0, 0))
        self.client.log_batch(run.info.run_id, metrics=metrics,
                              params=[Param(k, str(v)[:500]) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    # --- approximate unlearning (s3t_ops.memorization) ----------------------------------------
    def log_unlearning(self, run_name: str, params: dict, metrics: dict, tags: dict | None = None) -> str:
        """One run per approximate-unlearning model; always tagged s3t.kind=approximate_unlearning, approximate=true."""
        import math

        from mlflow.entities import Metric, Param

        run_tags = {**{k: str(v) for k, v in (tags or {}).items()}, "s3t.kind": "approximate_unlearning", "approximate": "true"}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        values = [Metric(k, float(v), 0, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(run.info.run_id, metrics=values, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    # --- registry ---------------------------------------------------------------------------
    def champion(self) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        try:
            v = self.client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException:
            return None
        return {"version": int(v.version), "tags": dict(v.tags), "plan_digest": v.tags.get("plan_digest"),
                "run_id": v.run_id}

    def register_plan(self, engine, plan_id: int, record: dict, tags: dict[str, str] | None = None) -> int:
        """Log the plan as a pyfunc model, register a new version, move `champion` to it."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ColSpec, Schema

        labels = list(engine.label_names)
        deleted = sorted(engine.ledger.deleted_ids())
        depths = {str(c["shard"]): c["depth"] for c in record["plan"]["choices"]}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpts = tmp / "checkpoints"
            ckpts.mkdir()
            for keys in record["checkpoints"].values():
                for k in keys:
                    shutil.copy2(engine.store.path(k), ckpts / f"{k}.safetensors")
            (tmp / "plan.json").write_text(json.dumps({**record, "plan_id": plan_id}, indent=2))
            (tmp / "meta.json").write_text(json.dumps({
                "config": {k: v for k, v in engine.cfg.to_dict().items() if k != "state_dir"},
                "label_names": labels, "backbone_fingerprint": engine.backbone_fingerprint()}, indent=2))
            (tmp / "honoured_deletions.json").write_text(json.dumps(deleted))
            signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                       outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", f"prob_{n}") for n in labels)]))
            joined = ",".join(deleted)
            version_tags = {
                "plan_id": str(plan_id), "plan_digest": plan_digest(record), "depths": json.dumps(depths),
                "live_shards": str(len(depths)), "honoured_deletions_count": str(len(deleted)),
                "honoured_deletions": joined if len(joined) <= MAX_TAG_CHARS else "see artifact honoured_deletions.json",
                "honoured_deletions_sha256": hashlib.sha256(joined.encode()).hexdigest(),
                **(tags or {}),
            }
            with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"ensemble-plan{plan_id}",
                                  tags={"s3t.kind": "ensemble", **version_tags}) as run:
                mlflow.log_metrics({"live_shards": len(depths), "mean_depth": sum(depths.values()) / max(1, engine.cfg.shards),
                                    "deletions": len(deleted)})
                mlflow.log_artifact(str(tmp / "honoured_deletions.json"))
                with warnings.catch_warnings():  # no input example: logging one would load the backbone
                    warnings.simplefilter("ignore", UserWarning)
                    info = mlflow.pyfunc.log_model(
                        name="ensemble", python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                        artifacts={"checkpoints": str(ckpts), "plan": str(tmp / "plan.json"), "meta": str(tmp / "meta.json")},
                        pip_requirements=["s3t-ops", "torch", "transformers", "peft", "safetensors", "pandas"],
                        signature=signature,
                    )
        version = self._register(info)
        for k, v in version_tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), k, v)
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(version))
        return version

    def _register(self, info) -> int:
        import mlflow

        mv = mlflow.register_model(info.model_uri, self.model_name, await_registration_for=0)
        return int(mv.version)

    def versions(self) -> list[dict[str, Any]]:
        vs = self.client.search_model_versions(f"name='{self.model_name}'")
        return sorted(({"version": int(v.version), "tags": dict(v.tags), "run_id": v.run_id} for v in vs),
                      key=lambda v: v["version"])

    def purge_superseded(self, engine) -> list[int]:
        """Delete non-champion versions (and their run artifacts) whose checkpoints saw a deleted example."""
        champ = self.champion()
        if champ is None:
            return []
        purged = []
        for v in self.versions():
            if v["version"] == champ["version"]:
                continue
            record = engine.ledger.plan(int(v["tags"].get("plan_id", -1)))
            tainted = record is None or bool(engine.audit(record))
            if not tainted:
                continue
            self.client.delete_model_version(self.model_name, str(v["version"]))
            if v["run_id"]:
                self._delete_run_artifacts(v["run_id"])
            purged.append(v["version"])
        return purged

    def _delete_run_artifacts(self, run_id: str) -> None:
        """Remove the run's artifacts from a local artifact store and mark the run deleted."""
        from urllib.parse import urlparse

        run = self.client.get_run(run_id)
        uri = run.info.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            shutil.rmtree(Path(parsed.path), ignore_errors=True)
        for logged in self._logged_models(run_id):
            try:
                self.client.delete_logged_model(logged.model_id)
            except Exception:
                pass
            loc = urlparse(getattr(logged, "artifact_location", "") or "")
            if loc.scheme in ("", "file") and loc.path:
                shutil.rmtree(Path(loc.path), ignore_errors=True)
        self.client.delete_run(run_id)

    def _logged_models(self, run_id: str) -> list:
        try:
            return list(self.client.search_logged_models(experiment_ids=[self.experiment_id],
                                                         filter_string=f"source_run_id = '{run_id}'"))
        except Exception:
            return []


def load_champion(model_name: str = "s3t-ensemble", tracking_uri: str | None = None):
    """The served model as the registry has it: `predict(DataFrame(text=...))` -> label + prob_<class>."""
    import mlflow
    import mlflow.pyfunc

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")

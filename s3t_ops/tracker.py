"""The MLflow store of a state, through one client: stage runs, the registered ensemble (versions, alias `champion`),
the champion's copy checked file by file, and the erasure of what holds a deleted example. (It is long because these
share one client, its state filter and its searches; split, each part would rebuild them.)

One store may serve many states (a shared `mlflow server`): every run and version carries the state's id (tag
`s3t.state_id`), every search is restricted to it, and the registered model is owned by one state. MLflow is
imported when a store is first used, not with this module, so a command that never publishes never pays for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from s3t_ops.faults import crash_point
from s3t_ops.publish import ForeignModel, PlanBundle, RegistryErasure

CHAMPION = "champion"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3.17's UI ignores this tag (it opens experiments on the GenAI overview unless the link carries
# ?workflowType=machine_learning, README); newer versions read it, so it stays
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}
STATE_TAG = "s3t.state_id"  # on every run, version and the registered model: which state they belong to
MODEL_DESCRIPTION = ("S3T ensemble (exact unlearning): each version serves, per shard, the longest stage prefix whose "
                     "checkpoints never saw a deleted example. Alias `champion` = the version to serve. Load it with "
                     "`mlflow.pyfunc.load_model(\"models:/{name}@champion\")` and call "
                     "`predict(pandas.DataFrame({{\"text\": [...]}}))`; a loaded version does not follow later "
                     "deletions: `s3t serve` does.")
MAX_TAG_CHARS = 4000  # well under MLflow's tag value limit; longer id lists go to an artifact only


def quiet_mlflow() -> None:
    """Before MLflow is first imported: no usage pings on the honour path, no per-file progress bars, no migration
    chatter, no nag about type hints on `predict` (inputs are checked there)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*", category=UserWarning)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def use_tracking_uri(uri: str) -> None:
    """Point mlflow's fluent API at `uri` without exporting it. mlflow.set_tracking_uri also writes
    MLFLOW_TRACKING_URI into os.environ, which every later child process (a Dagster step, an `s3t`
    subprocess) would read as the user's choice of registry, and refuse a state recorded with another."""
    quiet_mlflow()
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def default_tracking_uri(state_dir: str | Path) -> str:
    return f"sqlite:///{(Path(state_dir) / 'mlflow.db').resolve()}"


def default_artifact_root(state_dir: str | Path) -> str:
    return str((Path(state_dir) / "mlartifacts").resolve())


def verify_copy(ckpt_dir: Path, record: dict) -> list[str]:
    """Keys of the plan's checkpoint files in `ckpt_dir` that are missing or differ from the sha256 the plan recorded
    ([]: the copy is whole). Plans recorded before hashes were kept (no `sha256`) are not checked."""
    expected = record.get("sha256") or {}
    bad = []
    for keys in record["checkpoints"].values():
        for k in keys:
            if k not in expected:
                continue
            path = Path(ckpt_dir) / f"{k}.safetensors"
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected[k]:
                bad.append(k)
    return bad


def plan_digest(record: dict) -> str:
    """Identity of a plan for the registry: which checkpoints serve which shard."""
    return hashlib.sha256(json.dumps(record["checkpoints"], sort_keys=True).encode()).hexdigest()[:24]


class Tracker:
    """Tracking + registry over one MLflow store (a SQLite file by default, or an `mlflow server`).

    One store may serve many states (a shared `mlflow server`): every run and version carries the state's id
    (tag `s3t.state_id`), every search is restricted to it, and the registered model is owned by one state
    (its tag `s3t.state_id`): another state publishing under the same name is refused (ForeignModel)."""

    def __init__(self, tracking_uri: str, experiment: str = "s3t", model_name: str = "s3t-ensemble",
                 artifact_root: str | None = None, state_id: str | None = None):
        quiet_mlflow()
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.model_name = model_name
        self.state_id = state_id
        use_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # a local store keeps artifacts next to it; a server decides (--artifacts-destination)
            location = None if tracking_uri.startswith("http") or artifact_root is None else Path(artifact_root).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
            except Exception:  # created concurrently by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if exp.tags.get(key) != value:
                    self.client.set_experiment_tag(self.experiment_id, key, value)

    # --- this state's runs ----------------------------------------------------------------------
    def _mine(self, filter_string: str = "") -> str:
        """A run filter restricted to this state's runs (runs of older states, without the tag, when it has no id)."""
        own = f"tags.`{STATE_TAG}` = '{self.state_id}'" if self.state_id else ""
        return " AND ".join(f for f in (own, filter_string) if f)

    def search(self, filter_string: str = "", experiment_ids: list[str] | None = None, deleted: bool = False) -> list:
        from mlflow.entities import ViewType

        return list(self.client.search_runs(experiment_ids or [self.experiment_id], self._mine(filter_string),
                                            run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY, max_results=50000))

    def _tags(self, tags: dict) -> dict[str, str]:
        out = {k: str(v) for k, v in tags.items()}
        if self.state_id:
            out[STATE_TAG] = self.state_id
        return out

    # --- stage runs -------------------------------------------------------------------------
    def log_stage(self, row: dict, config: dict, tags: dict[str, str] | None = None) -> str:
        """One run per trained stage spanning the training itself: config params, per-stage counts apart
        (`stage.*`), per-epoch metrics, lineage tags (keyed slice versions and checkpoint keys: nothing a text
        could be matched against)."""
        from mlflow.entities import Metric, Param

        run_tags = {"s3t.kind": "stage", "s3t.shard": row["shard"], "s3t.stage": row["stage"],
                    "s3t.prefix": row["prefix"], "s3t.slice": row["slice"], "s3t.slice_version": row["slice_version"],
                    "s3t.checkpoint_key": row["key"], "s3t.parent_key": row.get("parent_key") or "",
                    **(row.get("lineage_tags") or {}), **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=f"stage{row['stage']}-s{row['shard']}-p{row['prefix']}",
                                     start_time=_millis(row.get("started_at")), tags=self._tags(run_tags))
        params = {f"config.{k}": v for k, v in config.items() if k != "state_dir"}
        params.update({"stage.shard": row["shard"], "stage.stage": row["stage"], "stage.prefix": row["prefix"],
                       "stage.n_examples": row["n_train"]})
        metrics = [Metric("train_loss", float(v), 0, e) for e, v in enumerate(row.get("epoch_losses") or [], start=1)]
        metrics += [Metric("train_accuracy", float(v), 0, e) for e, v in enumerate(row.get("epoch_accuracies") or [], start=1)]
        for name in ("val_acc", "seconds", "grad_example_steps"):
            if row.get(name) is not None:
                metrics.append(Metric(name, float(row[name]), 0, 0))
        self.client.log_batch(run.info.run_id, metrics=metrics,
                              params=[Param(k, str(v)[:500]) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, end_time=_millis(row.get("ended_at")))
        return run.info.run_id

    # --- approximate unlearning (s3t_ops.memorization) ----------------------------------------
    def log_unlearning(self, run_name: str, params: dict, metrics: dict, tags: dict | None = None) -> str:
        """One run per approximate-unlearning model; always tagged s3t.kind=approximate_unlearning, approximate=true."""
        import math

        from mlflow.entities import Metric, Param

        run_tags = self._tags({**(tags or {}), "s3t.kind": "approximate_unlearning", "approximate": "true"})
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        values = [Metric(k, float(v), 0, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(run.info.run_id, metrics=values, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    # --- registry ---------------------------------------------------------------------------
    def owner(self) -> str | None:
        """The state id the registered model belongs to (None: no such model yet, or one from before owners)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.model_name).tags.get(STATE_TAG)
        except MlflowException:
            return None

    def check_owner(self) -> None:
        """ForeignModel when another state owns the registered model name on this store."""
        owner = self.owner()
        if self.state_id and owner and owner != self.state_id:
            raise ForeignModel(f"the registered model {self.model_name!r} on {self.uri} belongs to another S3T state "
                                    f"(id {owner}); give this state its own name (S3T_MODEL_NAME when it is created)")

    def champion(self) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        try:
            v = self.client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException:
            return None
        if self.state_id and v.tags.get(STATE_TAG) not in (None, self.state_id):
            return None  # another state's version: not this state's champion
        return {"version": int(v.version), "tags": dict(v.tags), "plan_digest": v.tags.get("plan_digest"),
                "plan_id": v.tags.get("plan_id"), "run_id": v.run_id, "description": v.description, "model_id": _model_id(v)}

    def publish_plan(self, plan_id: int, record: dict, bundle: PlanBundle, new_version: bool = False) -> int:
        """Make `champion` serve this plan; idempotent, so a crash anywhere in it is finished by a retry.

        The same checkpoints as the champion's: its tags are brought up to date (the plan may honour a
        deletion that no served checkpoint saw). A version already registered for this plan (an earlier
        attempt died before moving the alias) is reused. Otherwise (or with `new_version`: the champion's copy is
        damaged) a new version is logged and registered.
        """
        self.check_owner()
        tags = {**self._version_tags(plan_id, record, bundle), **{k: str(v) for k, v in bundle.tags.items()}}
        champ = self.champion()
        if not new_version and champ is not None and champ["plan_digest"] == tags["plan_digest"]:
            version = champ["version"]
        else:
            version = None if new_version else self._version_for_plan(plan_id)
            if version is None:
                version = self._register(plan_id, record, tags, bundle)
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), k, v)
        self.client.update_model_version(self.model_name, str(version), description=_version_description(plan_id, record, tags))
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(version))
        crash_point("after_alias_moved")
        return version

    def _version_tags(self, plan_id: int, record: dict, bundle: PlanBundle) -> dict[str, str]:
        deleted = bundle.deleted
        depths = {str(c["shard"]): c["depth"] for c in record["plan"]["choices"]}
        joined = ",".join(deleted)
        return self._tags({
            "plan_id": str(plan_id), "plan_digest": plan_digest(record), "depths": json.dumps(depths),
            "live_shards": str(len(depths)), "honoured_deletions_count": str(len(deleted)),
            "honoured_deletions": joined if len(joined) <= MAX_TAG_CHARS else "see the model artifact honoured_deletions.json",
            "honoured_deletions_sha256": hashlib.sha256(joined.encode()).hexdigest(),
            "tombstones": "keyed (HMAC-SHA256 with the state's secret.key), not example ids",
        })

    def _version_for_plan(self, plan_id: int) -> int | None:
        for v in self.versions():
            if v["tags"].get("plan_id") == str(plan_id):
                return v["version"]
        return None

    def _register(self, plan_id: int, record: dict, tags: dict[str, str], bundle: PlanBundle) -> int:
        """Log the plan as a pyfunc model (its checkpoints as artifacts) and register a new version."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ColSpec, Schema

        labels = list(bundle.label_names)
        deleted = bundle.deleted
        depths = json.loads(tags["depths"])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpts = tmp / "checkpoints"
            ckpts.mkdir()
            for keys in record["checkpoints"].values():
                for k in keys:
                    (ckpts / f"{k}.safetensors").write_bytes(bundle.read_checkpoint(k))
            (tmp / "plan.json").write_text(json.dumps({**record, "plan_id": plan_id}, indent=2))
            (tmp / "meta.json").write_text(json.dumps({"config": bundle.config, "label_names": labels,
                                                       "backbone_fingerprint": bundle.backbone_fingerprint}, indent=2))
            (tmp / "honoured_deletions.json").write_text(json.dumps(deleted))
            signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                       outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", f"prob_{n}") for n in labels)]))
            with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"ensemble-plan{plan_id}",
                                  tags={"s3t.kind": "ensemble", **tags}) as run:
                mlflow.log_metrics({"live_shards": len(depths), "mean_depth": sum(depths.values()) / max(1, bundle.shards),
                                    "deletions": len(deleted)})
                with warnings.catch_warnings():  # no input example: logging one would load the backbone
                    warnings.simplefilter("ignore", UserWarning)
                    info = mlflow.pyfunc.log_model(
                        name="ensemble", python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                        artifacts={"checkpoints": str(ckpts), "plan": str(tmp / "plan.json"), "meta": str(tmp / "meta.json"),
                                   "honoured_deletions": str(tmp / "honoured_deletions.json")},
                        pip_requirements=["s3t-ops", "torch", "transformers", "peft", "safetensors", "pandas"],
                        signature=signature,
                    )
        crash_point("after_model_logged")
        self._ensure_model()
        mv = self.client.create_model_version(self.model_name, info.model_uri, run_id=run.info.run_id,
                                              tags={"plan_id": str(plan_id), **({STATE_TAG: self.state_id} if self.state_id else {})},
                                              model_id=info.model_id, await_creation_for=0)
        crash_point("after_version_registered")
        return int(mv.version)

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.model_name, description=MODEL_DESCRIPTION.format(name=self.model_name),
                                                    tags={STATE_TAG: self.state_id} if self.state_id else None)
            except MlflowException:  # created concurrently
                pass
            self.check_owner()
            return
        if self.state_id and STATE_TAG not in model.tags:  # a model from before owners were recorded: this state adopts it
            self.client.set_registered_model_tag(self.model_name, STATE_TAG, self.state_id)

    def versions(self) -> list[dict[str, Any]]:
        vs = self.client.search_model_versions(f"name='{self.model_name}'")
        out = [{"version": int(v.version), "tags": dict(v.tags), "run_id": v.run_id, "model_id": _model_id(v)}
               for v in vs if not self.state_id or v.tags.get(STATE_TAG) in (None, self.state_id)]
        return sorted(out, key=lambda v: v["version"])

    def rekey(self, kmap: dict[str, str], checkpoint_rows: list[dict]) -> int:
        """After the ledger migration to keyed slice versions (ledger.py `migrate_v2`): stage runs get the new keys and
        keyed versions in their tags, and every version registered before (its files are named by plain-derived keys)
        is deleted; the caller has registered the plan anew. Returns the runs re-tagged."""
        rows = {r["key"]: r for r in checkpoint_rows}
        n = 0
        for run in self.search("tags.`s3t.kind` = 'stage'"):
            old = run.data.tags.get("s3t.checkpoint_key")
            new = kmap.get(old)
            if new is None:
                continue
            row = rows.get(new, {})
            self.client.set_tag(run.info.run_id, "s3t.checkpoint_key", new)
            self.client.set_tag(run.info.run_id, "s3t.parent_key", row.get("parent_key") or "")
            self.client.set_tag(run.info.run_id, "s3t.slice_version", row.get("slice_version") or "")
            n += 1
        champ = self.champion()
        for v in self.versions():
            if champ is None or v["version"] != champ["version"]:
                self.delete_version(v["version"], v["run_id"])
        for run in self.search("tags.`s3t.kind` = 'ensemble'"):
            if champ is None or run.info.run_id != champ["run_id"]:
                self.hard_delete_run(run.info.run_id)
        return n

    # --- the registry's copy of the champion ---------------------------------------------------
    def champion_copy_damaged(self) -> list[str]:
        """Checkpoint keys whose copy in the champion version's artifacts is missing or differs from the sha256 its
        plan recorded ([]: whole, or no champion). The files are read through MLflow's artifact repository."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        champ = self.champion()
        if champ is None or not champ.get("model_id"):
            return []
        location = self.client.get_logged_model(champ["model_id"]).artifact_location
        with tempfile.TemporaryDirectory() as tmp:
            repo = get_artifact_repository(location)
            try:
                plan = json.loads(Path(repo.download_artifacts("artifacts/plan.json", tmp)).read_text())
            except Exception:
                return ["plan.json"]
            try:
                ckpts = repo.download_artifacts("artifacts/checkpoints", tmp)
            except Exception:
                ckpts = str(Path(tmp) / "missing")
            return verify_copy(Path(ckpts), plan)

    # --- erasure ----------------------------------------------------------------------------
    def erase(self, view: RegistryErasure) -> list[str]:
        """Hard-delete what holds a deleted example: non-champion versions (and ensemble runs) whose plan's
        lineage holds one, stage runs of checkpoints that trained on one, and approximate-unlearning runs whose
        memorization artifact was erased (all of this state's)."""
        removed = [f"model version {v}" for v in self.purge_superseded(view)]
        removed += [f"ensemble run {r}" for r in self._purge_orphan_ensemble_runs(view)]
        removed += [f"stage run {r}" for r in self._purge_stale_stage_runs(view)]
        removed += [f"memorization run {r}" for r in self._purge_memorization_runs(view)]
        return removed

    def delete_version(self, version: int, run_id: str | None) -> None:
        """A version's tags first (MLflow keeps a deleted version's row and tags otherwise), the version, its run."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_model_version(self.model_name, str(version)).tags
        except MlflowException:
            tags = {}
        for key in tags:
            self.client.delete_model_version_tag(self.model_name, str(version), key)
        self.client.delete_model_version(self.model_name, str(version))
        crash_point("during_registry_erase")
        if run_id:
            self.hard_delete_run(run_id)

    def purge_superseded(self, view: RegistryErasure) -> list[int]:
        """Delete non-champion versions (with their runs and artifacts) whose checkpoints saw a deleted example."""
        champ = self.champion()
        purged = []
        for v in self.versions():
            if champ is not None and v["version"] == champ["version"]:
                continue
            record = view.plan_of(int(v["tags"].get("plan_id", -1)))
            if record is not None and not view.tainted(record):
                continue  # exact: kept (a rollback target)
            self.delete_version(v["version"], v["run_id"])
            purged.append(v["version"])
        return purged

    def _purge_orphan_ensemble_runs(self, view: RegistryErasure) -> list[str]:
        """Ensemble runs no version points to (a crash between logging and registering) whose plan is tainted."""
        live = {v["run_id"] for v in self.versions()}
        out = []
        for run in self.search("tags.`s3t.kind` = 'ensemble'"):
            if run.info.run_id in live:
                continue
            record = view.plan_of(int(run.data.tags.get("plan_id", -1)))
            if record is None or view.tainted(record):
                self.hard_delete_run(run.info.run_id)
                out.append(run.info.run_id)
        return out

    def _purge_stale_stage_runs(self, view: RegistryErasure) -> list[str]:
        """Stage runs of checkpoints purged because they trained on a deleted example: their per-epoch metrics were
        computed on it."""
        stale = view.stale_keys
        out = []
        if not stale:
            return out
        for run in self.search("tags.`s3t.kind` = 'stage'"):
            if run.data.tags.get("s3t.checkpoint_key") in stale:
                self.hard_delete_run(run.info.run_id)
                out.append(run.info.run_id)
        return out

    def _purge_memorization_runs(self, view: RegistryErasure) -> list[str]:
        """Runs tagged with a memorization artifact that erasure removed (or that was never completed)."""
        from mlflow.entities import ViewType

        out = []
        exps = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ALL)]
        for tag in view.artifact_tags:
            for run in self.search(f"tags.`{tag}` != ''", experiment_ids=exps, deleted=True):
                artifact = run.data.tags.get(tag)
                if artifact and not view.artifact_alive(artifact):
                    self.hard_delete_run(run.info.run_id)
                    out.append(run.info.run_id)
        return out

    def hard_delete_run(self, run_id: str) -> None:
        """Remove a run for good: its artifacts and logged models (any artifact store, through MLflow's
        artifact repositories: local folders, or a server's proxied `mlflow-artifacts:`), then the run
        itself (a hard delete where the backend allows it: SQLite/Postgres stores; a server's REST API only
        soft-deletes: its rows hold no example data, only keyed tombstones and keys)."""
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return  # already gone
        for logged in self._logged_models(run_id):
            if logged.artifact_location:
                _delete_artifacts(get_artifact_repository(logged.artifact_location))
            try:
                self.client.delete_logged_model(logged.model_id)
            except MlflowException:
                pass
            store = self._store()
            if hasattr(store, "_hard_delete_logged_model"):
                store._hard_delete_logged_model(logged.model_id)
        _delete_artifacts(get_artifact_repository(run.info.artifact_uri))
        if run.info.lifecycle_stage != "deleted":
            self.client.delete_run(run_id)
        store = self._store()
        if hasattr(store, "_hard_delete_run"):
            store._hard_delete_run(run_id)

    def _store(self):
        from mlflow.tracking._tracking_service.utils import _get_store

        return _get_store(self.uri)

    def _logged_models(self, run_id: str) -> list:
        try:
            return list(self.client.search_logged_models(experiment_ids=[self.experiment_id],
                                                         filter_string=f"source_run_id = '{run_id}'"))
        except Exception:
            return []


def _model_id(version) -> str | None:
    """The logged model a version registers (SQLite stores keep it in `source` = models:/<id> only)."""
    mid = getattr(version, "model_id", None)
    source = getattr(version, "source", "") or ""
    if not mid and source.startswith("models:/m-"):
        mid = source.removeprefix("models:/").split("/", 1)[0]
    return mid or None


def _delete_artifacts(repo) -> None:
    """Delete every artifact under a repository root (a missing folder is already erased)."""
    try:
        repo.delete_artifacts()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if getattr(exc, "errno", None) != 2:
            raise


def _millis(value) -> int | None:
    if value is None:
        return None
    import datetime as _dt

    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    return int(value.replace(tzinfo=_dt.timezone.utc).timestamp() * 1000)


def _version_description(plan_id: int, record: dict, tags: dict[str, str]) -> str:
    depths = json.loads(tags["depths"])
    dead = record["plan"]["m"] - len(depths)
    shards = ", ".join(f"shard {s}: depth {d}" for s, d in depths.items()) or "no live shard"
    return (f"S3T serving plan {plan_id}: {shards}" + (f"; {dead} dead shard(s)" if dead else "") +
            f". Honours {tags['honoured_deletions_count']} deletion request(s): no checkpoint of this version was trained "
            "on a deleted example (tags list their keyed tombstones).")

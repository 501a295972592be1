"""Data files through fsspec (s3t_ops/storage.py): the same flow on a local folder, on `memory://` and on a
filesystem that refuses every path outside its bucket gives byte-equal checkpoints, trunk and slice files,
the same plans and predictions; nothing but the ledger's files stays in the local state folder; erasure,
repair and bad URLs behave as they do locally."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.erasure import erase_pending, traces
from s3t_ops.serving import plan_in
from s3t_ops.publish import Publisher
from s3t_ops.storage import StorageError
from tests.conftest import SHARED_SECRET, toy_frame

pytestmark = pytest.mark.timeout(600)

BASE = dict(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
            n_train=None, n_val=8, n_test=8)
LEDGER_FILES = ["config.json", "ledger.duckdb", "ledger.duckdb.lock", "secret.key", "served-plan.json", "server.token"]


class StrictFileSystem(LocalFileSystem):
    """A local folder (`bucket`) reached only as `strict://`: any path outside the bucket is refused, and
    the engine cannot take it for a local folder (its protocol is not `file`), so it writes through fsspec."""

    protocol = "strict"
    bucket: Path | None = None

    @classmethod
    def _strip_protocol(cls, path):
        path = super()._strip_protocol(path)
        if cls.bucket is None or not (path + "/").startswith(str(cls.bucket) + "/"):
            raise PermissionError(f"strict:// refuses {path!r}: outside its bucket {cls.bucket}")
        return path


class UnreachableFileSystem(MemoryFileSystem):
    """An object store that cannot be reached (as with wrong credentials or no network)."""

    protocol = "unreachable"

    def exists(self, path, **kwargs):
        raise ConnectionError("connection refused")


fsspec.register_implementation("strict", StrictFileSystem, clobber=True)
fsspec.register_implementation("unreachable", UnreachableFileSystem, clobber=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def cfg_for(backbone_dir: Path, state: Path, storage_url: str | None = None, **changes) -> S3TConfig:
    return S3TConfig(**{**BASE, "backbone": str(backbone_dir), "state_dir": state, "storage_url": storage_url, **changes})


def all_slices(eng: S3T) -> None:
    for s in range(eng.cfg.shards):
        for j in range(eng.cfg.slices):
            eng.materialize_slice(s, j)


def run_flow(cfg: S3TConfig, data: Path) -> dict:
    """train -> forget one example in each shard -> retrain, with the pipeline's slice files written after each."""
    eng = S3T.create(cfg, data, publisher=Publisher(), progress=False, secret=SHARED_SECRET)  # one keyspace: comparable keys
    eng.fit()
    all_slices(eng)
    train = eng.examples("train").sort_values("id")
    victims = [train[train["shard"] == s]["id"].iloc[0] for s in range(cfg.shards)]
    texts = train.set_index("id").loc[victims, "text"].tolist()
    forget = eng.forget(victims)
    accuracy_after_forget = eng.evaluate("test")
    eng.retrain()
    all_slices(eng)
    files = {rel: eng.storage.read_bytes(rel) for pattern in ("checkpoints/*/*", "trunk/*", "slices/*")
             for rel in eng.storage.glob(pattern)}
    probe = ["a lovely happy day", "an awful sad day", *texts]
    labels, probs = eng.ensemble().predict(probe)
    return {"engine": eng, "victims": victims, "texts": texts, "forget": forget, "files": files,
            "accuracy_after_forget": accuracy_after_forget, "accuracy": eng.evaluate("test"), "labels": labels,
            "probs": probs, "served": eng.served()[1], "rows": set(eng.ledger.checkpoints(live_only=False)["key"])}


@pytest.fixture(scope="module")
def flows(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("storage")
    data = root / "toy.csv"
    toy_frame(60).to_csv(data, index=False)
    bucket = root / "bucket"
    bucket.mkdir()
    StrictFileSystem.bucket = bucket.resolve()
    memory = f"memory://s3t-flow-{uuid.uuid4().hex[:8]}"
    out = {"local": run_flow(cfg_for(tiny_backbone_dir, root / "local"), data),
           "memory": run_flow(cfg_for(tiny_backbone_dir, root / "memory", memory), data),
           "strict": run_flow(cfg_for(tiny_backbone_dir, root / "strict", f"strict://{bucket.resolve()}/s3t"), data)}
    out["bucket"] = bucket.resolve()
    yield out
    fsspec.filesystem("memory").rm(memory, recursive=True)
    StrictFileSystem.bucket = None


@pytest.mark.parametrize("where", ["memory", "strict"])
def test_the_flow_on_fsspec_storage_equals_the_local_one_byte_for_byte(flows, where):
    local, other = flows["local"], flows[where]
    assert other["victims"] == local["victims"]
    assert other["forget"].dirty == local["forget"].dirty and other["forget"].plan == local["forget"].plan
    assert other["forget"].grad_example_steps == 0
    # every checkpoint (retrained ones included), trunk file and slice file: same names, same bytes
    assert sorted(other["files"]) == sorted(local["files"])
    assert any(rel.startswith("checkpoints/") for rel in local["files"])
    for rel, data in local["files"].items():
        assert other["files"][rel] == data, rel
    assert other["rows"] == local["rows"] and other["served"] == local["served"]
    assert other["accuracy_after_forget"] == local["accuracy_after_forget"] and other["accuracy"] == local["accuracy"]
    assert torch.equal(other["labels"], local["labels"]) and torch.equal(other["probs"], local["probs"])
    eng = other["engine"]
    assert eng.missing_stages() == [] and eng.audit() == {} and traces(eng.state) == {}


def test_local_storage_keeps_its_layout_in_the_state_folder(flows):
    eng = flows["local"]["engine"]
    assert eng.storage.local and eng.storage.local_path() == Path(eng.cfg.state_dir)
    for rel in flows["local"]["files"]:
        assert (eng.root / rel).is_file(), rel
    key = next(iter(eng.checkpoint_rows()))
    assert eng.checkpoints.path(key) == eng.root / "checkpoints" / key[:2] / f"{key}.safetensors"


def test_only_the_ledger_stays_in_the_local_state_folder(flows):
    for where in ("memory", "strict"):
        eng = flows[where]["engine"]
        assert sorted(os.listdir(eng.root)) == LEDGER_FILES, where
        with pytest.raises(StorageError):
            eng.storage.local_path("trunk")  # no code path can take the storage for a local folder
    bucket = flows["bucket"]
    assert sorted(os.listdir(bucket)) == ["s3t"] and sorted(os.listdir(bucket / "s3t")) == ["checkpoints", "slices", "trunk"]
    strict = flows["strict"]["engine"]
    assert strict.checkpoints.location(next(iter(strict.checkpoint_rows()))).startswith(f"strict://{bucket}/s3t/checkpoints/")
    with pytest.raises(PermissionError, match="refuses"):
        StrictFileSystem().cat_file(str(strict.root / "ledger.duckdb"))


def test_erasure_on_memory_storage_removes_every_trace(memory_url, tmp_path, tiny_backbone_dir):
    data = tmp_path / "toy.csv"
    toy_frame(40).to_csv(data, index=False)
    eng = S3T.create(cfg_for(tiny_backbone_dir, tmp_path / "state", memory_url), data, publisher=Publisher(), progress=False)
    eng.build_trunk()
    eng.materialize_slice(0, 0)
    members = eng.ledger.members(0, 0)
    victim = members["id"].iloc[0]
    text = eng.examples().set_index("id").loc[victim, "text"]
    eng.ledger.honour([victim], plan_in(eng.state))  # honoured, not yet erased (as after a crash)
    found = traces(eng.state)
    assert set(found) == {f"{memory_url}/trunk/train-s0-j0.safetensors", f"{memory_url}/slices/s0-j0.parquet"}
    assert all(n == 1 for n in found.values())
    erase_pending(eng.state)
    assert traces(eng.state) == {} and eng.ledger.pending_erasure() == set()
    fs = fsspec.filesystem("memory")
    objects = fs.find(memory_url)
    assert objects and all(victim.encode() not in fs.cat_file(p) and text.encode() not in fs.cat_file(p) for p in objects)
    assert len(eng.slice_trunk(0, 0)) == len(members) - 1


def test_repair_on_memory_storage_removes_orphan_and_damaged_checkpoint_objects(memory_url, tmp_path, tiny_backbone_dir):
    data = tmp_path / "toy.csv"
    toy_frame(30).to_csv(data, index=False)
    cfg = cfg_for(tiny_backbone_dir, tmp_path / "state", memory_url, shards=1, slices=1, budget=1)
    eng = S3T.create(cfg, data, publisher=Publisher(), progress=False)
    eng.fit()
    (key,) = eng.checkpoint_rows()
    fs = fsspec.filesystem("memory")
    orphan = "ab" + "0" * 22
    fs.pipe_file(f"{memory_url}/checkpoints/ab/{orphan}.safetensors", b"weights of a crash between object and row")
    original = eng.checkpoints.read(key, None)
    fs.pipe_file(f"{memory_url}/checkpoints/{key[:2]}/{key}.safetensors", original[:-8] + b"\xff" * 8)

    eng = S3T.open(cfg.state_dir, publisher=Publisher(), progress=False)
    actions = "\n".join(eng.last_repair.actions)
    assert f"deleted orphan checkpoint file {memory_url}/checkpoints/ab/{orphan}.safetensors" in actions
    assert f"checkpoint file {memory_url}/checkpoints/{key[:2]}/{key}.safetensors is damaged" in actions
    assert eng.checkpoints.keys_on_disk() == set() and eng.checkpoint_rows() == {}
    assert not any(key in keys for keys in eng.served()[1]["checkpoints"].values())
    eng.retrain()
    assert eng.checkpoints.keys_on_disk() == {key} and eng.checkpoints.read(key, None) == original  # retrained bit for bit
    assert S3T.open(cfg.state_dir, publisher=Publisher(), progress=False).last_repair.actions == []


def test_bad_storage_urls_are_one_line_before_anything_is_created(tmp_path, tiny_backbone_dir, capsys, memory_url):
    from s3t_ops.cli import main

    with pytest.raises(ConfigError, match="storage_url: unknown protocol 'nope'"):
        cfg_for(tiny_backbone_dir, tmp_path / "s", "nope://bucket/x")
    if not _installed("s3fs"):
        with pytest.raises(ConfigError, match="storage_url: .*needs a package"):
            cfg_for(tiny_backbone_dir, tmp_path / "s", "s3://bucket/x")
    data = tmp_path / "toy.csv"
    toy_frame(30).to_csv(data, index=False)
    for url, message in [("nope://bucket/x", "storage_url: unknown protocol"),
                         ("unreachable://bucket/x", "storage unreachable://bucket/x is unreachable: connection refused")]:
        state = tmp_path / f"state-{url.split(':')[0]}"
        args = ["train", "--state", str(state), "--source", str(data), "--storage-url", url, "--backbone", str(tiny_backbone_dir),
                "--shards", "1", "--slices", "1", "--budget", "1", "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not state.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".state")]
    # one URL per state: a second state cannot be created over another's files
    S3T.create(cfg_for(tiny_backbone_dir, tmp_path / "first", memory_url, shards=1, slices=1, budget=1), data,
               publisher=Publisher(), progress=False).build_trunk()
    with pytest.raises(StorageError, match="already holds trunk/"):
        S3T.create(cfg_for(tiny_backbone_dir, tmp_path / "second", memory_url, shards=1, slices=1, budget=1), data,
                   publisher=Publisher(), progress=False)
    assert not (tmp_path / "second").exists()
    first = S3T.open(tmp_path / "first", publisher=Publisher(), progress=False)
    first.storage.clear()  # what `s3t demo --fresh` does to a state stored elsewhere
    assert first.storage.glob("*/*") == [] and first.storage.glob("*") == []


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_storage_url_is_recorded_and_outside_the_fingerprint(tmp_path, memory_url):
    from pipelines.settings import load_settings

    plain, stored = S3TConfig(state_dir=tmp_path), S3TConfig(state_dir=tmp_path, storage_url=memory_url)
    assert plain.training_fingerprint() == stored.training_fingerprint()  # same checkpoint keys wherever they live
    old = {k: v for k, v in stored.to_dict().items() if k != "storage_url"}
    assert S3TConfig.from_dict(old).storage_url is None  # a state saved before the field keeps its data in its folder
    assert S3TConfig.from_dict(stored.to_dict()).storage_url == memory_url
    assert load_settings({"S3T_STATE": str(tmp_path / "new"), "S3T_STORAGE_URL": memory_url}).cfg.storage_url == memory_url
    (tmp_path / "config.json").write_text('{"storage_url": null}')
    with pytest.raises(ValueError, match="S3T_STORAGE_URL=.* differs"):
        load_settings({"S3T_STATE": str(tmp_path), "S3T_STORAGE_URL": memory_url})


def test_the_pipeline_trains_forgets_and_retrains_on_memory_storage(memory_url, tmp_path, tiny_backbone_dir):
    """The Dagster assets (in-process: the memory filesystem is per process) on non-local storage."""
    import dagster as dg

    from pipelines.definitions import build_definitions
    from pipelines.partitions import S3TPartitions
    from pipelines.settings import PipelineSettings

    data = tmp_path / "toy.csv"
    toy_frame(40).to_csv(data, index=False)
    cfg = cfg_for(tiny_backbone_dir, tmp_path / "state", memory_url)
    defs = build_definitions(PipelineSettings(cfg=cfg, retrain_policy="eager", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    slice_data = defs.resolve_assets_def("slice_data")
    stages = [defs.resolve_assets_def(f"stage_{k}") for k in (1, 2)]
    with dg.instance_for_test() as instance:
        assert dg.materialize([defs.resolve_assets_def("examples")], instance=instance,
                              run_config={"ops": {"examples": {"config": {"source": str(data)}}}}).success
        for key in slice_data.partitions_def.get_partition_keys():
            assert dg.materialize([slice_data], partition_key=key, instance=instance, selection=[slice_data]).success
        for key in stages[0].partitions_def.get_partition_keys():
            assert dg.materialize(stages, partition_key=key, instance=instance).success
        assert dg.materialize([defs.resolve_assets_def("s3t_ensemble")], instance=instance).success
        eng = S3T.open(cfg.state_dir, progress=False)
        victim = eng.examples("train").sort_values("id")["id"].iloc[0]
        out = defs.resolve_job_def("forget").execute_in_process(
            run_config={"ops": {"forget_examples": {"config": {"ids": [victim]}}}}, instance=instance)
        assert out.success
        for s, j in out.output_for_node("forget_examples")["dirty"]:
            assert dg.materialize([slice_data], partition_key=S3TPartitions.slice_partition(s, j), instance=instance,
                                  selection=[slice_data]).success
        for key in stages[0].partitions_def.get_partition_keys():
            assert dg.materialize(stages, partition_key=key, instance=instance).success
        eng = S3T.open(cfg.state_dir, progress=False)
        assert eng.missing_stages() == [] and eng.audit() == {} and traces(eng.state) == {}
        assert {p.name for p in eng.root.iterdir()} <= {*LEDGER_FILES, "mlflow.db", "mlartifacts"}
        assert eng.checkpoints.keys_on_disk() == set(eng.checkpoint_rows())

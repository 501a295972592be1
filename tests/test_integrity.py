"""Integrity and erasure at every door: what the state promises holds outside its own ledger too.

Each test is one promise that a hostile user broke on the previous release (issue 18):
1. keyed slice versions: a deletion cannot be confirmed from the text alone (ledger, MLflow tags, demo summary);
2. the registry door refuses a damaged checkpoint copy, and `s3t status` re-publishes it;
3. a damaged trunk file is rebuilt from the backbone, never used (exactness holds; a broken header is no crash);
4. a moved or copied state erases and publishes only inside itself;
5. two states on one MLflow store (a shared SQLite file, a local `mlflow server`) keep their own models and runs;
6. a broken registry never blocks erasure of the state's own files, and the next command finishes the registry;
plus bad numbers and a full disk (one line, exit 2, nothing left behind), and the migration of a schema-2 state.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from s3t_ops.cli import main
from s3t_ops.engine import S3T
from tests.conftest import toy_frame
from tests.servers import free_port, stop, wait_http
from tests.statecheck import byte_scan, cli_env, hash_tree, run_cli, tiny_world

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_backbone_dir):
    """A trained state with its own MLflow store (the default registry) and the pipeline's slice files."""
    root = tmp_path_factory.mktemp("integrity")
    cfg, data = tiny_world(root, tiny_backbone_dir, 72, state="template")
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    for s in range(2):
        for j in range(2):
            engine.materialize_slice(s, j)
    return root / "template", data, cfg


def _copy(template, dst: Path) -> Path:
    shutil.copytree(template[0], dst)  # a plain copy: opening it re-roots its MLflow store (promise 4)
    return dst


def _victim(engine: S3T, shard: int = 0, slc: int = 0) -> tuple[str, str]:
    train = engine.examples("train")
    row = train[(train["shard"] == shard) & (train["slice"] == slc)].iloc[0]
    return row["id"], row["text"]


def _plain_version(ids) -> str:
    """What the previous release kept as a slice's version: a plain sha256 of its sorted ids."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- 1. keyed versions

def test_a_deletion_cannot_be_confirmed_from_the_text_alone(template, tmp_path):
    state = _copy(template, tmp_path / "s")
    engine = S3T.open(state, progress=False)
    x, _ = _victim(engine)
    engine.forget([x])
    members = engine.ledger.members(0, 0)["id"].tolist()
    guess = _plain_version(members + [x])  # the attack: "current members + the id of a text" -> the old version
    with engine.ledger.connect() as con:
        versions = {r[0] for r in con.execute("SELECT version FROM slice_versions").fetchall()}
        recorded = {r[0] for r in con.execute("SELECT slice_version FROM checkpoints").fetchall()}
    assert len(versions) > 4 and guess not in versions and guess not in recorded
    assert _plain_version(members) not in versions  # nor the current one
    tracker = engine.publisher.tracker
    tags = {r.data.tags.get("s3t.slice_version") for r in tracker.search("tags.`s3t.kind` = 'stage'", deleted=True)}
    assert tags and guess not in tags and tags <= versions  # MLflow carries the keyed versions only
    # the owner, holding the key, still recognises the old version: the key is what makes them unlinkable
    assert engine.ledger.keyring.slice_version(members + [x]) in versions


# ---------------------------------------------------------------- 2. the registry door

def test_the_registry_refuses_a_damaged_copy_and_status_republishes_it(template, tmp_path, capsys):
    import mlflow.pyfunc

    from s3t_ops.champion import load_champion

    state = _copy(template, tmp_path / "s")
    engine = S3T.open(state, progress=False)
    tracker = engine.publisher.tracker
    before = tracker.champion()["version"]
    copies = sorted((state / "mlartifacts").rglob("checkpoints/*.safetensors"))
    assert copies
    _flip(copies[0], copies[0].stat().st_size - 9)  # one bit of a tensor, header intact: loads, predicts differently
    with pytest.raises(Exception, match="damaged copy"):
        load_champion(tracker.model_name, tracker.uri)
    assert main(["status", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "was damaged" in out and "re-published" in out, out
    champ = tracker.champion()
    assert champ["version"] > before and [v["version"] for v in tracker.versions()] == [champ["version"]]
    model = mlflow.pyfunc.load_model(f"models:/{tracker.model_name}@champion")
    texts = ["a lovely happy day", "an awful sad day"]
    _, probs = S3T.open(state, progress=False).ensemble().predict(texts)
    got = model.predict(pd.DataFrame({"text": texts}))
    assert got[[f"prob_{n}" for n in engine.label_names]].to_numpy() == pytest.approx(probs.double().numpy(), abs=1e-6)
    assert main(["status", "--state", str(state)]) == 0
    assert "damaged" not in capsys.readouterr().out  # whole again: nothing to do


# ---------------------------------------------------------------- 3. the trunk cache

def test_a_damaged_trunk_file_is_rebuilt_never_used(template, tmp_path):
    clean = S3T.open(_copy(template, tmp_path / "clean"), progress=False)
    x, _ = _victim(clean, 1, 1)
    clean.forget([x])
    clean.retrain()
    reference = {(s.shard, s.seq, s.stage): clean.checkpoints.path(s.key).read_bytes() for s in clean.stage_specs()}

    state = _copy(template, tmp_path / "s")
    mantissa = state / "trunk" / "train-s1-j0.safetensors"  # a slice the retraining reads
    _flip(mantissa, mantissa.stat().st_size - 5)
    header = state / "trunk" / "train-s0-j1.safetensors"
    _flip(header, 12)  # inside the JSON header (ids): the old erasure failed decoding it
    engine = S3T.open(state, progress=False)
    engine.forget([x])  # erasure meets the broken header: removed unread, no crash
    engine.retrain()
    ours = {(s.shard, s.seq, s.stage): engine.checkpoints.path(s.key).read_bytes() for s in engine.stage_specs()}
    assert ours == reference  # the flipped bit never reached a checkpoint
    for rel in ("trunk/train-s1-j0.safetensors", "trunk/train-s0-j1.safetensors"):
        assert engine.data_files.intact(rel)  # rebuilt from the backbone, recorded again
    assert engine.evaluate("test") == clean.evaluate("test")


def test_a_damaged_eval_trunk_is_rebuilt_before_evaluating(template, tmp_path):
    state = _copy(template, tmp_path / "s")
    reference = S3T.open(state, progress=False).evaluate("test")
    path = state / "trunk" / "test.safetensors"
    _flip(path, path.stat().st_size - 3)
    engine = S3T.open(state, progress=False)
    assert engine.evaluate("test") == reference
    assert engine.data_files.intact("trunk/test.safetensors")


# ---------------------------------------------------------------- 4. a portable state

def test_a_moved_and_a_copied_state_erase_and_publish_only_inside_themselves(template, tmp_path):
    first = _copy(template, tmp_path / "first")
    S3T.open(first, progress=False)
    moved = tmp_path / "moved"
    os.rename(first, moved)
    engine = S3T.open(moved, progress=False)
    x, text = _victim(engine)
    engine.forget([x])
    assert not first.exists()  # nothing written at the old path (MLflow would create it again)
    assert byte_scan(moved, [x, text]) == []
    served = {k for keys in engine.served()[1]["checkpoints"].values() for k in keys}
    copies = {p.stem for p in (moved / "mlartifacts").rglob("checkpoints/*.safetensors")}
    assert copies == served  # no copy of a checkpoint that saw x is left in the registry's artifacts
    champ = engine.publisher.tracker.champion()
    assert engine.ledger.tombstone(x) in champ["tags"]["honoured_deletions"].split(",")

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    original = hash_tree(moved)
    other = S3T.open(copy, progress=False)
    y, _ = _victim(other, 1, 1)
    other.forget([y])
    other.retrain()
    assert hash_tree(moved) == original  # the copy erased and published inside itself only
    assert S3T.open(moved, progress=False).ledger.is_deleted(y) is False


# ---------------------------------------------------------------- 5. one MLflow store, many states

@pytest.fixture(params=["sqlite", "server"])
def shared_store(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    port = free_port()
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def test_two_states_on_one_store_keep_their_own_models_and_runs(shared_store, tmp_path, tiny_backbone_dir):
    from s3t_ops.engine import StateError
    from s3t_ops.registry import MlflowPublisher

    cfg_a, data = tiny_world(tmp_path, tiny_backbone_dir, 60, state="a")
    cfg_b = cfg_a.replace(state_dir=tmp_path / "b")
    a = S3T.create(cfg_a, data, progress=False, publisher=MlflowPublisher(cfg_a.state_dir, shared_store))
    a.fit()
    with pytest.raises(StateError, match="belongs to another S3T state"):  # the same model name: refused before any write
        S3T.create(cfg_b, data, progress=False, publisher=MlflowPublisher(cfg_b.state_dir, shared_store))
    assert not cfg_b.state_dir.exists()
    b = S3T.create(cfg_b, data, progress=False, publisher=MlflowPublisher(cfg_b.state_dir, shared_store, model_name="b-model"))
    b.fit()
    ta, tb = a.publisher.tracker, b.publisher.tracker
    b_versions, b_runs = tb.versions(), {r.info.run_id for r in tb.search()}
    assert ta.champion()["version"] == 1 and tb.champion()["version"] == 1  # each model its own versions
    assert not {r.info.run_id for r in ta.search()} & b_runs
    a.forget([_victim(a)[0]])
    assert ta.champion()["version"] == 2
    assert tb.versions() == b_versions and {r.info.run_id for r in tb.search()} == b_runs  # b untouched
    assert tb.champion()["tags"]["s3t.state_id"] == b.ledger.get_meta("state_id")


# ---------------------------------------------------------------- 6. a broken registry

def test_a_broken_registry_never_blocks_erasure(template, tmp_path):
    state = _copy(template, tmp_path / "s")
    engine = S3T.open(state, progress=False)
    x, text = _victim(engine)
    artifacts = state / "mlartifacts"
    aside = tmp_path / "mlartifacts-aside"
    os.rename(artifacts, aside)
    artifacts.write_text("not a folder")  # MLflow cannot write artifacts any more
    r = run_cli(["forget", x, "--state", str(state)])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "honoured by plan" in r.stderr and "erased from the state's files" in r.stderr
    scanned = [hit for hit in byte_scan(state, [x, text])]
    assert scanned == []  # ledger, trunk and slices no longer hold it, registry or not
    status = run_cli(["status", "--state", str(state), "--json"])
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["deletions"]["erased"] == 1 and s["registry"]["pending_erasure"] == 1 and s["registry"]["error"]
    artifacts.unlink()
    os.rename(aside, artifacts)
    assert run_cli(["status", "--state", str(state)]).returncode == 0  # the next command finishes the registry
    engine = S3T.open(state, progress=False)
    champ = engine.publisher.tracker.champion()
    assert champ["plan_id"] == str(engine.served()[0])
    assert engine.ledger.tombstone(x) in champ["tags"]["honoured_deletions"].split(",")
    assert engine.ledger.deletions()["registry_erased_at"].notna().all()
    assert [v["version"] for v in engine.publisher.tracker.versions()] == [champ["version"]]


# ---------------------------------------------------------------- bad numbers, a full disk

def test_a_bad_number_is_one_line(tmp_path):
    r = run_cli(["train", "--state", str(tmp_path / "s"), "--n-val", "abc"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "s3t train: error: argument --n-val: invalid int value: 'abc' (see `s3t train --help`)"]
    assert not (tmp_path / "s").exists()


def test_a_full_disk_during_a_new_train_is_one_line_and_leaves_nothing(tmp_path, tiny_backbone_dir):
    data = tmp_path / "toy.csv"
    toy_frame(60).to_csv(data, index=False)
    args = ["train", "--state", str(tmp_path / "s"), "--source", str(data), "--shards", "2", "--slices", "2", "--budget", "2",
            "--epochs", "1", "--batch-size", "8", "--max-tokens", "16", "--lora-rank", "4", "--n-train", "0", "--n-val", "8",
            "--n-test", "8", "--backbone", str(tiny_backbone_dir), "--quiet"]
    code = "import sys; from s3t_ops.cli import main; sys.exit(main(sys.argv[1:]))"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # files above 64 KiB cannot be written

    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=cli_env(),
                       preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3t: error: the disk is full"), lines
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s*"))


# ---------------------------------------------------------------- a state of the previous release

def _to_schema_2(state: Path) -> dict[str, str]:
    """Rewrite a state as the previous release kept it: plain slice versions, checkpoint keys derived from them,
    schema 2 (no data_files table, no registry_erased_at). Returns ({schema-2 key: today's key}, the plain versions)."""
    import duckdb

    from s3t_ops.checkpoints import stage_key

    con = duckdb.connect(str(state / "ledger.duckdb"))
    try:
        vmap = {}
        for v, s, j, current in con.execute("SELECT version, shard, slice, is_current FROM slice_versions").fetchall():
            ids = [r[0] for r in con.execute("SELECT id FROM examples WHERE split='train' AND shard=? AND slice=?", [s, j]).fetchall()]
            assert current
            vmap[v] = _plain_version(ids)
        kmap = {}
        rows = con.execute("SELECT key, shard, stage, parent_key, slice, slice_version, prefix_versions FROM checkpoints ORDER BY stage").fetchall()
        engine_roots = json.loads((state / "roots.json").read_text())
        for key, s, stage, parent, slc, sv, pvs in rows:
            parent_old = engine_roots[str(s)] if parent is None else kmap[parent]
            kmap[key] = stage_key(parent_old, slc, vmap[sv], stage)
        for key, s, stage, parent, slc, sv, pvs in rows:
            con.execute("UPDATE checkpoints SET key = ?, parent_key = ?, slice_version = ?, prefix_versions = ? WHERE key = ?",
                        [kmap[key], None if parent is None else kmap[parent], vmap[sv], json.dumps([vmap[v] for v in json.loads(pvs)]), key])
        for old, new in vmap.items():
            con.execute("UPDATE slice_versions SET version = ? WHERE version = ?", [new, old])
            con.execute("UPDATE slice_members SET version = ? WHERE version = ?", [new, old])
        for pid, plan in con.execute("SELECT plan_id, plan FROM plans").fetchall():
            record = json.loads(plan)
            record["checkpoints"] = {sh: [kmap[k] for k in keys] for sh, keys in record["checkpoints"].items()}
            record.pop("sha256", None)
            con.execute("UPDATE plans SET plan = ? WHERE plan_id = ?", [json.dumps(record, sort_keys=True), pid])
        con.execute("DROP TABLE data_files")
        con.execute("ALTER TABLE deletions DROP COLUMN registry_erased_at")
        con.execute("DELETE FROM meta WHERE key IN ('state_id', 'root')")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    finally:
        con.close()
    for new, old in ((n, o) for n, o in kmap.items()):
        src = state / "checkpoints" / new[:2] / f"{new}.safetensors"
        dst = state / "checkpoints" / old[:2] / f"{old}.safetensors"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
    (state / "roots.json").unlink()
    return {old: new for new, old in kmap.items()}, set(vmap.values())


def test_a_state_of_the_previous_schema_is_migrated_in_place(tmp_path, tiny_backbone_dir):
    from s3t_ops.checkpoints import root_key
    from s3t_ops.publish import Publisher

    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 60)
    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    engine.fit()
    texts = ["a lovely happy day", "an awful sad day"]
    _, probs = engine.ensemble().predict(texts)
    today = {(s.shard, s.seq, s.stage): s.key for s in engine.stage_specs()}
    n = len(engine.label_names)
    roots = {str(s): root_key(cfg.training_fingerprint(), engine.backbone_fingerprint(), s, n) for s in range(cfg.shards)}
    (cfg.state_dir / "roots.json").write_text(json.dumps(roots))
    old_to_new, plain = _to_schema_2(cfg.state_dir)
    assert set(old_to_new.values()) == set(today.values())

    migrated = S3T.open(cfg.state_dir, progress=False, publisher=Publisher())
    assert migrated.ledger.schema_version == 3 and migrated.missing_stages() == []  # nothing to retrain
    assert {(s.shard, s.seq, s.stage): s.key for s in migrated.stage_specs()} == today  # the keyed keys, files renamed
    assert migrated.checkpoints.keys_on_disk() == set(today.values())
    _, again = migrated.ensemble().predict(texts)
    assert (again == probs).all()
    x, _ = _victim(migrated)
    assert migrated.forget([x]).plan is not None and migrated.audit() == {}
    with migrated.ledger.connect() as con:
        versions = {r[0] for r in con.execute("SELECT version FROM slice_versions").fetchall()}
    assert plain and not versions & plain  # no plain version left: re-keyed

"""DuckDB ledger: the atomic honour transaction, keyed tombstones, versions, lineage, guarded checkpoint
rows, plans and their publication, damage detection, and the process lock."""
from __future__ import annotations

import hashlib
import json

import duckdb
import pandas as pd
import pytest

from s3t_ops.ledger import Ledger, LedgerDamagedError, LedgerError, UnknownExampleError
from s3t_ops.tombstones import Keyring


def _frame() -> pd.DataFrame:
    """Two shards x two slices with three members each, plus a val and a test example."""
    rows = []
    for s in range(2):
        for j in range(2):
            for n in range(3):
                rows.append(dict(id=f"e{s}{j}{n}", text=f"text {s}{j}{n}", label=n % 2, split="train", shard=s, slice=j))
    rows.append(dict(id="v0", text="a val text", label=0, split="val", shard=None, slice=None))
    rows.append(dict(id="t0", text="a test text", label=1, split="test", shard=None, slice=None))
    f = pd.DataFrame(rows)
    f["shard"] = f["shard"].astype("Int64")
    f["slice"] = f["slice"].astype("Int64")
    return f


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    keyring = Keyring.create(tmp_path)
    _ROOT[:] = [tmp_path]
    led = Ledger(tmp_path / "ledger.duckdb")
    led.create(keyring)
    led.add_examples(_frame())
    return led


def _plan(con) -> tuple[dict, int]:
    """A stand-in for the engine's planner: records which slice versions it saw inside the transaction."""
    versions = con.execute("SELECT shard, slice, version FROM slice_versions WHERE is_current ORDER BY ALL").fetchall()
    return {"plan": {"m": 2, "choices": []}, "checkpoints": {}, "versions": [list(v) for v in versions]}, 0


def _forget(ledger: Ledger, ids):
    return ledger.honour(ids, _plan)


def _ckpt(key, shard, prefix, parent, slc, version):
    return dict(key=key, shard=shard, prefix="-".join(map(str, prefix)), stage=len(prefix), parent_key=parent, slice=slc,
                slice_version=version, prefix_versions=json.dumps([version]), sha256="0" * 64, n_train=1,
                grad_example_steps=1, steps=1, val_acc=0.5, seconds=0.1, started_at=None)


def _record(ledger: Ledger, key, shard, prefix, parent, slc, version) -> bool:
    return ledger.record_checkpoint(_ckpt(key, shard, prefix, parent, slc, version), [(shard, slc, version)], lambda: None)


def slice_version(ids):
    """The version the ledger's own key gives these members (keyed: tombstones.Keyring.slice_version)."""
    return Keyring.load(_ROOT[0]).slice_version(ids)


_ROOT: list = []


def test_ingest_once_with_a_version_per_slice(ledger):
    versions = ledger.slice_versions(2, 2)
    assert versions[(0, 1)] == slice_version(["e010", "e011", "e012"])
    assert len(set(versions.values())) == 4
    assert ledger.slice_counts()["n_live"].tolist() == [3, 3, 3, 3]
    with pytest.raises(LedgerError, match="already holds"):
        ledger.add_examples(_frame())
    assert len(ledger.examples()) == 14


def test_honour_is_one_transaction_durable_and_idempotent(ledger):
    r = _forget(ledger, ["e010", " e010 "])  # duplicates and whitespace collapse
    assert r.new == ("e010",) and r.already == () and r.dirty == ((0, 1),)
    # the plan was computed inside the transaction: it saw the new version of slice (0, 1)
    assert [0, 1, slice_version(["e011", "e012"])] in r.record["versions"]
    fresh = Ledger(ledger.path)  # another process would see the same file
    assert "e010" not in set(fresh.examples()["id"])
    tomb = ledger.tombstone("e010")
    assert fresh.deleted() == {tomb} and fresh.is_deleted("e010")
    d = fresh.deletions()
    assert d["honoured_by_plan"].tolist() == [r.plan_id] and d["honoured_at"].notna().all() and d["erased_at"].isna().all()
    assert fresh.latest_plan()[0] == r.plan_id
    again = _forget(fresh, ["e010"])
    assert again.new == () and again.already == ("e010",) and again.dirty == () and again.plan_id == r.plan_id
    mixed = _forget(fresh, ["e010", "e100"])
    assert mixed.new == ("e100",) and mixed.already == ("e010",) and mixed.dirty == ((1, 0),)
    assert len(fresh.deletions()) == 2


def test_tombstones_are_keyed_so_the_text_alone_cannot_confirm_a_deletion(ledger, tmp_path):
    _forget(ledger, ["e010"])
    unkeyed = hashlib.sha256(b"e010").hexdigest()
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        stored = {r[0] for r in con.execute("SELECT tombstone FROM deletions UNION ALL SELECT member FROM slice_members").fetchall()}
    assert ledger.tombstone("e010") in stored and "e010" not in stored
    assert not any(unkeyed.startswith(t) or t.startswith(unkeyed[:16]) for t in stored)
    (tmp_path / "other").mkdir()
    other = Keyring.create(tmp_path / "other")
    assert other.tombstone("e010") != ledger.tombstone("e010")  # a per-state secret
    assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0  # readable by the owner only


def test_forget_eval_example_dirties_no_slice(ledger):
    before = ledger.slice_versions(2, 2)
    r = _forget(ledger, ["v0"])
    assert r.new == ("v0",) and r.dirty == ()
    assert ledger.slice_versions(2, 2) == before
    assert ledger.examples("val").empty


def test_unknown_or_blank_id_raises_and_writes_nothing(ledger):
    before_examples = ledger.examples()
    before_versions = ledger.slice_versions(2, 2)
    with pytest.raises(UnknownExampleError) as exc:
        _forget(ledger, ["e000", "nope", "nada"])  # one real id among unknown ones
    msg = str(exc.value)
    assert "2 unknown example id(s)" in msg and "nada, nope" in msg and "nothing was deleted" in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr
    pd.testing.assert_frame_equal(ledger.examples(), before_examples)
    assert ledger.deletions().empty and ledger.latest_plan() is None
    assert ledger.slice_versions(2, 2) == before_versions
    for bad in ([], ["e000", "  "]):
        with pytest.raises(ValueError):
            _forget(ledger, bad)
    assert ledger.deletions().empty


def test_a_failure_inside_the_honour_transaction_rolls_everything_back(ledger):
    def boom(con):
        raise RuntimeError("planner failed")

    with pytest.raises(RuntimeError, match="planner failed"):
        ledger.honour(["e000"], boom)
    assert "e000" in set(ledger.examples()["id"]) and ledger.deletions().empty and ledger.latest_plan() is None


def test_slice_versions_change_for_dirty_slices_only(ledger):
    before = ledger.slice_versions(2, 2)
    r = _forget(ledger, ["e000", "e002", "e110"])
    assert r.dirty == ((0, 0), (1, 1))
    after = ledger.slice_versions(2, 2)
    assert {c for c in before if before[c] != after[c]} == {(0, 0), (1, 1)}
    assert after[(0, 0)] == slice_version(["e001"])
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        rows = con.execute("SELECT shard, slice, n_members FROM slice_versions ORDER BY created_at, shard, slice").fetchall()
        members = con.execute("SELECT member FROM slice_members WHERE version = ?", [after[(0, 0)]]).fetchall()
        current = con.execute("SELECT count(*) FROM slice_versions WHERE is_current").fetchall()[0][0]
    assert sorted(rows)[:2] == [(0, 0, 1), (0, 0, 3)] and len(rows) == 6 and current == 4
    assert members == [(ledger.tombstone("e001"),)]


def test_lineage_follows_the_parent_chain(ledger):
    v = ledger.slice_versions(2, 2)
    assert _record(ledger, "a1", 0, (1,), None, 1, v[(0, 1)])
    assert _record(ledger, "a2", 0, (1, 0), "a1", 0, v[(0, 0)])
    assert _record(ledger, "b1", 1, (0,), None, 0, v[(1, 0)])
    t = ledger.tombstone
    s01 = {t("e010"), t("e011"), t("e012")}
    s00 = {t("e000"), t("e001"), t("e002")}
    assert ledger.lineage("a1") == s01
    assert ledger.lineage("a2") == s01 | s00
    assert ledger.lineage("b1") == {t("e100"), t("e101"), t("e102")}
    assert ledger.lineage("unknown") == set()

    _forget(ledger, ["e011"])
    # an old checkpoint keeps the lineage it was trained on (so audits can catch it) ...
    assert t("e011") in ledger.lineage("a2")
    # ... and a checkpoint trained on the new version never contains the deleted id
    v2 = ledger.slice_versions(2, 2)
    assert _record(ledger, "c1", 0, (1,), None, 1, v2[(0, 1)])
    assert _record(ledger, "c2", 0, (1, 0), "c1", 0, v2[(0, 0)])
    assert ledger.lineage("c2") == (s01 - {t("e011")}) | s00

    ledger.mark_purged(["a1", "a2"], "stale")
    live = set(ledger.checkpoints()["key"])
    assert live == {"b1", "c1", "c2"}
    every = ledger.checkpoints(live_only=False).set_index("key")
    assert set(every.index) == live | {"a1", "a2"}
    assert every.loc[["a1", "a2"], "purged_at"].notna().all() and (every.loc[["a1", "a2"], "purge_reason"] == "stale").all()


def test_a_checkpoint_is_recorded_only_while_its_data_and_parent_are_current(ledger):
    v = ledger.slice_versions(2, 2)
    placed = []
    _forget(ledger, ["e011"])  # slice (0, 1) changed after "training" started
    stale = _ckpt("s1", 0, (1,), None, 1, v[(0, 1)])
    assert not ledger.record_checkpoint(stale, [(0, 1, v[(0, 1)])], lambda: placed.append("s1"))
    assert placed == [] and "s1" not in set(ledger.checkpoints(live_only=False)["key"])
    assert _record(ledger, "p1", 1, (0,), None, 0, v[(1, 0)])
    ledger.mark_purged(["p1"], "stale")
    child = _ckpt("p2", 1, (0, 1), "p1", 1, v[(1, 1)])
    assert not ledger.record_checkpoint(child, [(1, 0, v[(1, 0)]), (1, 1, v[(1, 1)])], lambda: placed.append("p2"))
    assert placed == []  # the file is never placed under its final name


def test_retrained_mark_waits_until_no_stage_is_stale(ledger):
    _forget(ledger, ["e000"])
    assert not ledger.mark_retrained(lambda con: True)
    assert ledger.deletions()["retrained_at"].isna().all()
    assert ledger.mark_retrained(lambda con: False)
    assert ledger.deletions()["retrained_at"].notna().all()


def test_plans_honour_pending_deletions_and_record_their_publication(ledger):
    assert ledger.latest_plan() is None
    p1 = ledger.record_plan({"plan": {"m": 2, "choices": []}, "checkpoints": {"0": ["k"]}}, n_live=1)
    r = _forget(ledger, ["e000", "t0"])
    assert r.plan_id == p1 + 1
    ledger.compact()
    p3 = ledger.record_plan({"plan": {"m": 2, "choices": []}, "checkpoints": {}}, n_live=0)
    assert p3 == p1 + 2  # the plan id sequence survives the compaction that erases deleted text
    assert ledger.plan(p1)["checkpoints"] == {"0": ["k"]} and ledger.plan(9999) is None
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        assert con.execute("SELECT plan_id, n_live, n_deletions FROM plans ORDER BY plan_id").fetchall() == \
            [(p1, 1, 0), (p1 + 1, 0, 2), (p3, 0, 2)]
    assert ledger.publication(p3) == (None, None)
    ledger.mark_published(p3, 7)
    at, version = ledger.publication(p3)
    assert at is not None and version == 7


def test_compaction_removes_deleted_text_from_the_file_and_its_leftovers(ledger):
    assert b"text 010" in ledger.path.read_bytes()
    _forget(ledger, ["e010"])
    (ledger.path.parent / "ledger.duckdb.compact").write_bytes(b"half a copy from a crash")
    ledger.compact()
    data = ledger.path.read_bytes()
    assert b"text 010" not in data and b"text 011" in data
    assert not (ledger.path.parent / "ledger.duckdb.compact").exists()
    assert not (ledger.path.parent / "ledger.duckdb.wal").exists()
    assert len(Ledger(ledger.path).examples()) == 13


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_ledger_is_reported_and_never_written(ledger, damage):
    data = ledger.path.read_bytes()
    if damage == "truncate":
        ledger.path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ledger.path.write_bytes(b"not a database" * 100)
    else:
        ledger.path.write_bytes(b"")
    before = ledger.path.read_bytes()
    fresh = Ledger(ledger.path)
    with pytest.raises(LedgerDamagedError, match="is damaged .*restore it from a backup"):
        fresh.check()
    with pytest.raises(LedgerDamagedError):
        _forget(fresh, ["e000"])
    assert ledger.path.read_bytes() == before
    assert not (ledger.path.parent / "ledger.duckdb.wal").exists()


def test_a_ledger_of_another_schema_is_refused(ledger):
    with duckdb.connect(str(ledger.path)) as con:
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema 1"):
        Ledger(ledger.path).check()


def test_meta_round_trip(ledger):
    ledger.set_meta("label_names", ["neg", "pos"])
    ledger.set_meta("label_names", ["a", "b"])
    assert Ledger(ledger.path).get_meta("label_names") == ["a", "b"]
    assert ledger.get_meta("missing", 7) == 7


def _writer(path: str, worker: int, n: int) -> int:
    """A separate process recording checkpoints and reading plans, as concurrent Dagster step workers do."""
    led = Ledger(path)
    version = led.slice_versions(2, 2)[(worker % 2, 0)]
    for i in range(n):
        assert led.record_checkpoint(_ckpt(f"w{worker}-{i}", worker % 2, (0,), None, 0, version),
                                     [(worker % 2, 0, version)], lambda: None)
        led.latest_plan()
    return n


@pytest.mark.timeout(300)
def test_concurrent_processes_queue_on_the_lock_instead_of_failing(ledger):
    """DuckDB allows one read-write process per file: the process lock queues writers (and a compaction)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        pending = pool.starmap_async(_writer, [(str(ledger.path), w, 15) for w in range(4)])
        _forget(ledger, ["e110"])
        ledger.compact()  # swaps the file while the others wait for it
        done = pending.get(timeout=240)
    assert done == [15] * 4
    assert len(ledger.checkpoints()) == 60


def test_a_lock_held_too_long_is_a_clear_error(ledger):
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(ledger.lock_path)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        impatient = Ledger(ledger.path, wait_s=0.5)
        with pytest.raises(LedgerError, match="stayed locked by another process"):
            impatient.examples()
    finally:
        holder.kill()
        holder.wait(timeout=10)

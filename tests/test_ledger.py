"""DuckDB ledger: durable idempotent deletions, clean failure on unknown ids, versions, lineage, plans."""
from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from s3t_ops.ledger import Ledger, UnknownExampleError
from s3t_ops.partition import slice_version


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
    led = Ledger(tmp_path / "ledger.duckdb")
    led.init()
    led.add_examples(_frame())
    return led


def _ckpt(key, shard, prefix, parent, slc, version):
    return dict(key=key, shard=shard, prefix="-".join(map(str, prefix)), stage=len(prefix), parent_key=parent, slice=slc,
                slice_version=version, path=f"/x/{key}", n_train=1, grad_example_steps=1, steps=1, val_acc=0.5, seconds=0.1)


def test_ingest_once_with_a_version_per_slice(ledger):
    versions = ledger.slice_versions(2, 2)
    assert versions[(0, 1)] == slice_version(["e010", "e011", "e012"])
    assert len(set(versions.values())) == 4
    assert ledger.slice_counts()["n_live"].tolist() == [3, 3, 3, 3]
    with pytest.raises(RuntimeError, match="already holds"):
        ledger.add_examples(_frame())
    assert len(ledger.examples()) == 14


def test_forget_is_durable_and_idempotent(ledger):
    r = ledger.forget(["e010", " e010 "])  # duplicates and whitespace collapse
    assert r.new == ("e010",) and r.already == () and r.dirty == ((0, 1),)
    fresh = Ledger(ledger.path)  # another process would see the same file
    assert "e010" not in set(fresh.examples()["id"])
    assert fresh.deleted_ids() == {"e010"}
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM examples WHERE id='e010' OR text='text 010'").fetchall()[0][0] == 0
        assert con.execute("SELECT shard, slice, split FROM deletions").fetchall() == [(0, 1, "train")]
    # erased, not flagged: the text is not left in freed blocks of the file
    assert b"text 010" not in ledger.path.read_bytes() and b"text 011" in ledger.path.read_bytes()
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["ledger.duckdb"]
    again = fresh.forget(["e010"])
    assert again.new == () and again.already == ("e010",) and again.dirty == ()
    mixed = fresh.forget(["e010", "e100"])
    assert mixed.new == ("e100",) and mixed.already == ("e010",) and mixed.dirty == ((1, 0),)
    assert len(fresh.deletions()) == 2


def test_forget_eval_example_dirties_no_slice(ledger):
    before = ledger.slice_versions(2, 2)
    r = ledger.forget(["v0"])
    assert r.new == ("v0",) and r.dirty == ()
    assert ledger.slice_versions(2, 2) == before
    assert ledger.examples("val").empty


def test_unknown_id_raises_and_writes_nothing(ledger):
    before_examples = ledger.examples()
    before_versions = ledger.slice_versions(2, 2)
    with pytest.raises(UnknownExampleError) as exc:
        ledger.forget(["e000", "nope", "nada"])  # one real id among unknown ones
    msg = str(exc.value)
    assert "2 unknown example id(s)" in msg and "nada, nope" in msg and "nothing was deleted" in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr
    assert isinstance(exc.value, KeyError)
    pd.testing.assert_frame_equal(ledger.examples(), before_examples)
    assert ledger.deletions().empty
    assert ledger.slice_versions(2, 2) == before_versions
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM slice_versions").fetchall()[0][0] == 4
    with pytest.raises(ValueError):
        ledger.forget([])


def test_slice_versions_change_for_dirty_slices_only(ledger):
    before = ledger.slice_versions(2, 2)
    r = ledger.forget(["e000", "e002", "e110"])
    assert r.dirty == ((0, 0), (1, 1))
    after = ledger.slice_versions(2, 2)
    assert {c for c in before if before[c] != after[c]} == {(0, 0), (1, 1)}
    assert after[(0, 0)] == slice_version(["e001"])
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        rows = con.execute("SELECT shard, slice, n_members FROM slice_versions ORDER BY created_at, shard, slice").fetchall()
        members = con.execute("SELECT example_id FROM slice_members WHERE version = ?", [after[(0, 0)]]).fetchall()
    assert sorted(rows)[:2] == [(0, 0, 1), (0, 0, 3)] and len(rows) == 6
    assert members == [("e001",)]


def test_lineage_ids_follow_the_parent_chain(ledger):
    v = ledger.slice_versions(2, 2)
    ledger.record_checkpoint(_ckpt("a1", 0, (1,), None, 1, v[(0, 1)]))
    ledger.record_checkpoint(_ckpt("a2", 0, (1, 0), "a1", 0, v[(0, 0)]))
    ledger.record_checkpoint(_ckpt("b1", 1, (0,), None, 0, v[(1, 0)]))
    s01 = {"e010", "e011", "e012"}
    s00 = {"e000", "e001", "e002"}
    assert ledger.lineage_ids("a1") == s01
    assert ledger.lineage_ids("a2") == s01 | s00
    assert ledger.lineage_ids("b1") == {"e100", "e101", "e102"}
    assert ledger.lineage_ids("unknown") == set()

    ledger.forget(["e011"])
    # an old checkpoint keeps the lineage it was trained on (so audits can catch it) ...
    assert "e011" in ledger.lineage_ids("a2")
    # ... and a checkpoint trained on the new version never contains the deleted id
    v2 = ledger.slice_versions(2, 2)
    ledger.record_checkpoint(_ckpt("c1", 0, (1,), None, 1, v2[(0, 1)]))
    ledger.record_checkpoint(_ckpt("c2", 0, (1, 0), "c1", 0, v2[(0, 0)]))
    assert ledger.lineage_ids("c2") == (s01 - {"e011"}) | s00

    ledger.mark_purged(["a1", "a2"])
    live = set(ledger.checkpoints()["key"])
    assert live == {"b1", "c1", "c2"}
    every = ledger.checkpoints(live_only=False)
    assert set(every["key"]) == live | {"a1", "a2"}
    assert every.set_index("key").loc[["a1", "a2"], "purged_at"].notna().all()


def test_plans_are_recorded_and_honour_pending_deletions(ledger):
    assert ledger.latest_plan() is None
    p1 = ledger.record_plan({"plan": {"m": 2, "choices": []}, "checkpoints": {"0": ["k"]}}, n_live=1)
    ledger.forget(["e000", "t0"])
    p2 = ledger.record_plan({"plan": {"m": 2, "choices": []}, "checkpoints": {}}, n_live=0)
    assert p2 == p1 + 1  # the plan id sequence survives the compaction that erases deleted text
    assert ledger.latest_plan() == (p2, {"plan": {"m": 2, "choices": []}, "checkpoints": {}})
    assert ledger.plan(p1)["checkpoints"] == {"0": ["k"]}
    assert ledger.plan(9999) is None
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        assert con.execute("SELECT plan_id, n_live, n_deletions FROM plans ORDER BY plan_id").fetchall() == [(p1, 1, 0), (p2, 0, 2)]
    assert ledger.mark_honoured(p2) == 2
    d = ledger.deletions()
    assert d["honoured_by_plan"].tolist() == [p2, p2] and d["honoured_at"].notna().all()
    assert d["retrained_at"].isna().all()
    ledger.mark_retrained()
    assert ledger.deletions()["retrained_at"].notna().all()
    assert ledger.mark_honoured(p2 + 1) == 0  # nothing pending any more


def test_meta_round_trip(ledger):
    ledger.set_meta("label_names", ["neg", "pos"])
    ledger.set_meta("label_names", ["a", "b"])
    assert Ledger(ledger.path).get_meta("label_names") == ["a", "b"]
    assert ledger.get_meta("missing", 7) == 7


def _writer(path: str, worker: int, n: int) -> int:
    """A separate process recording checkpoints and reading plans, as concurrent Dagster step workers do."""
    led = Ledger(path)
    for i in range(n):
        led.record_checkpoint(_ckpt(f"w{worker}-{i}", worker % 2, (0,), None, 0, "v"))
        led.latest_plan()
    return n


def test_concurrent_processes_never_fail_on_the_file_lock(ledger):
    """DuckDB allows one read-write process per file: short retried connections serialise writers."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        done = pool.starmap(_writer, [(str(ledger.path), w, 15) for w in range(4)])
    ledger.forget(["e000"])  # a compaction while nothing else holds the file
    assert done == [15] * 4
    assert len(ledger.checkpoints()) == 60

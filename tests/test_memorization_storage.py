"""Memorization artifacts in the state's storage (s3t_ops/memorization/artifacts.py): on `memory://` both doors
(`s3t unlearn`, the three assets) write under the URL, nothing under the local state folder, and give the
local run's results; erasure removes every artifact naming a forgotten example; an incomplete artifact (a
write or an erasure cut short) is read by nothing and removed by erase or the next rewrite."""
from __future__ import annotations

import json
import uuid

import fsspec
import pandas as pd
import pytest
import torch

from s3t_ops.memorization import artifacts as store
from s3t_ops.storage import Storage
from tests.conftest import toy_frame

pytestmark = pytest.mark.timeout(600)

BASE = dict(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
            n_train=None, n_val=12, n_test=12)


def _artifact_files(storage: Storage) -> dict[str, bytes]:
    """Every file of the memorization artifacts, relative to `memorization/`, with its bytes."""
    return {rel.split("/", 1)[1]: storage.read_bytes(rel) for rel in storage.files(store.PREFIX)}


def _doors(root, name: str, backbone, data, storage_url: str | None) -> dict:
    """A tiny trained state (default publisher: its registry in the state folder) after both doors ran."""
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.memorization.config import MemorizationConfig
    from s3t_ops.memorization.service import (materialize_report, materialize_scores, materialize_unlearned, tracker_for,
                                              unlearn_command)

    cfg = S3TConfig(**BASE, backbone=str(backbone), state_dir=root / name, storage_url=storage_url)
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    tiny = MemorizationConfig(epochs=1, lr=5e-3, batch_size=8)
    cli = unlearn_command(cfg.state_dir, method="rum_f", n_forget=6, mcfg=tiny)
    scores = materialize_scores(engine, tiny, holdout=False, inventory=True)
    unlearned = materialize_unlearned(engine, "vanilla", "confidence", None, 6)
    report = materialize_report(engine, controls=False, tracker=tracker_for(engine))
    return {"engine": engine, "cli": cli, "scores": scores, "unlearned": unlearned, "report": report,
            "files": _artifact_files(engine.storage)}


@pytest.fixture(scope="module")
def doors(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("mem-storage")
    data = root / "toy.csv"
    toy_frame(60).to_csv(data, index=False)
    url = f"memory://s3t-mem-doors-{uuid.uuid4().hex[:8]}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {"local": _doors(root, "local", tiny_backbone_dir, data, None),
               "memory": _doors(root, "memory", tiny_backbone_dir, data, url), "url": url}
    finally:
        torch.set_num_threads(threads)
        fsspec.filesystem("memory").rm(url, recursive=True)


def _untimed(record):
    """A report's record without its timings (`seconds`, at any depth): what must equal across storages."""
    if isinstance(record, dict):
        return {k: _untimed(x) for k, x in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [_untimed(x) for x in record]
    return record


def test_both_doors_on_memory_storage_write_under_the_url_and_equal_the_local_run(doors):
    local, memory, url = doors["local"], doors["memory"], doors["url"]
    state = memory["engine"].root
    assert not (state / store.PREFIX).exists()  # nothing was staged or left in the local state folder
    run = f"runs/{memory['cli']['id']}-rum_f"
    for result, name, file in [(memory["cli"], run, "report.json"), (memory["report"], "report", "report.json")]:
        assert result["json"] == f"{url}/memorization/{name}/{file}" and result["png"] == f"{url}/memorization/{name}/report.png"
    assert memory["cli"]["model"] == f"{url}/memorization/{run}/model.safetensors"
    assert memory["scores"]["path"] == f"{url}/memorization/scores/scores.parquet"
    assert memory["unlearned"]["path"] == f"{url}/memorization/unlearned/model.safetensors"
    assert memory["scores"]["original"].startswith(f"{url}/memorization/original-")

    # the same artifacts, each with its completion marker; the same files, byte for byte where no timing is recorded
    def same_run_name(files: dict[str, bytes]) -> dict[str, bytes]:  # the `s3t unlearn` run folder is named by a stamp
        return {"runs/cli/" + f.split("/", 2)[2] if f.startswith("runs/") else f: data for f, data in files.items()}

    lf, mf = same_run_name(local["files"]), same_run_name(memory["files"])
    markers = {f"{f.rsplit('/', 1)[0]}/{store.COMPLETE}" for f in lf}
    assert set(mf) == set(lf) | markers and len(markers) == 5  # original, scores, unlearned, report, the run
    for f, data in lf.items():
        if f.endswith((store.IDS, ".safetensors", ".parquet")):  # the JSON records hold timings
            assert mf[f] == data, f
    assert json.loads(mf["scores/scores.json"])["spearman"] == json.loads(lf["scores/scores.json"])["spearman"]
    local_cli, memory_cli = (json.loads(files["runs/cli/report.json"]) for files in (lf, mf))
    pairs = [*zip(local_cli["runs"], memory_cli["runs"]), (json.loads(lf["report/report.json"]), json.loads(mf["report/report.json"]))]
    for a, b in pairs:
        assert _untimed(a["variants"]) == _untimed(b["variants"])
    # the registry sees them as complete artifacts: nothing to purge
    from s3t_ops.erasure import registry_erasure

    engine = memory["engine"]
    assert engine.publisher.tracker._purge_memorization_runs(registry_erasure(engine.state)) == []


def test_forgetting_an_example_erases_every_artifact_naming_it_on_memory_storage(doors):
    from mlflow.entities import ViewType

    memory = doors["memory"]
    engine, storage = memory["engine"], memory["engine"].storage
    tracker = engine.publisher.tracker

    def memorization_runs():
        exps = [e.experiment_id for e in tracker.client.search_experiments(view_type=ViewType.ALL)]
        return tracker.client.search_runs(exps, f"tags.`{store.ARTIFACT_TAG}` != ''", run_view_type=ViewType.ALL)

    assert memorization_runs() and storage.files(store.PREFIX)
    victim = memory["cli"]["forget_ids"][0]  # in every artifact's training data
    text = engine.examples("train").set_index("id").loc[victim, "text"]
    engine.forget([victim])
    assert storage.files(store.PREFIX) == [] and memorization_runs() == []
    fs = fsspec.filesystem("memory")
    assert all(victim.encode() not in fs.cat_file(p) and text.encode() not in fs.cat_file(p) for p in fs.find(doors["url"]))
    assert engine.ledger.pending_erasure() == set() and not (engine.root / store.PREFIX).exists()


def _write(storage: Storage, name: str, ids: list[str], files: dict[str, bytes]) -> None:
    with store.writer(storage, name, ids) as w:
        for f, data in files.items():
            (w.stage / f).write_bytes(data)


class Crash(Exception):
    pass


def test_an_incomplete_artifact_is_read_by_nothing_and_removed_by_erase_or_a_rewrite(memory_url, monkeypatch):
    storage = Storage(memory_url)
    _write(storage, store.UNLEARNED, ["a"], {"unlearned.json": b"{}"})
    _write(storage, "runs/20250101T000000Z-abcdef-rum", ["b"], {"report.json": b"{}"})
    assert storage.files(f"{store.PREFIX}/{store.UNLEARNED}") == [f"memorization/unlearned/{f}" for f in
                                                                    (store.COMPLETE, store.IDS, "unlearned.json")]
    # a write cut short after ids.json and one file: no marker, so no reader takes it
    puts = []

    def crash_on_third_put(rel, data, real=storage.write_bytes):
        puts.append(rel)
        if len(puts) == 3:
            raise Crash(rel)
        return real(rel, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_third_put)
    table = pd.DataFrame({"confidence": [0.5]}, index=["a"])
    with pytest.raises(Crash):
        store.save_scores(storage, table, {"n_train": 1}, ["a"])
    monkeypatch.undo()
    assert puts[0] == f"{store.PREFIX}/scores/{store.IDS}"  # ids first: the leftover names its ids
    assert storage.files(f"{store.PREFIX}/scores") == [f"{store.PREFIX}/scores/{store.IDS}", f"{store.PREFIX}/scores/scores.json"]
    assert not store.complete(storage, "scores")
    with pytest.raises(FileNotFoundError, match="materialize memorization_scores first"):
        store.load_scores(storage)
    # a rewrite replaces whatever a crash left: no stale file survives, the marker comes last
    _write(storage, "report", ["c"], {"stale.json": b"{}", "report.json": b"{}"})
    storage.remove(f"{store.PREFIX}/report/{store.COMPLETE}")  # a rewrite cut short just after removing the old marker
    _write(storage, "report", ["c"], {"report.json": b"new"})
    assert storage.files(f"{store.PREFIX}/report") == [f"{store.PREFIX}/report/{f}" for f in (store.COMPLETE, store.IDS, "report.json")]
    assert storage.read_bytes(f"{store.PREFIX}/report/report.json") == b"new"
    # erase removes the incomplete artifact whatever its ids, keeps the complete ones it has no reason to touch
    erased = store.erase(storage, lambda i: False)
    assert erased.paths == [f"{memory_url}/memorization/scores"] and erased.mlflow_tags == ["scores"]
    assert store.erase(storage, lambda i: False) == store.Erased()
    assert {f.split("/")[1] for f in storage.files(store.PREFIX)} == {"report", "runs", store.UNLEARNED}


def test_an_erasure_cut_short_is_finished_by_the_next_call(memory_url, monkeypatch):
    storage = Storage(memory_url)
    _write(storage, store.SCORES, ["a", "x"], {"scores.json": b"{}", "scores.parquet": b"table"})
    _write(storage, "runs/20250101T000000Z-abcdef-rum", ["x"], {"report.json": b"{}", "model.safetensors": b"weights"})
    _write(storage, store.REPORT, ["a"], {"report.json": b"{}"})
    removed = []

    def crash_on_second_removal(rel, real=storage.remove):
        removed.append(rel)
        if len(removed) == 2:
            raise Crash(rel)
        return real(rel)

    monkeypatch.setattr(storage, "remove", crash_on_second_removal)
    with pytest.raises(Crash):
        store.erase(storage, lambda i: i == "x")
    monkeypatch.undo()
    assert removed[0].endswith(f"/{store.COMPLETE}")  # the marker first: what is left is read by nothing
    assert not store.complete(storage, "runs/20250101T000000Z-abcdef-rum")
    assert store.complete(storage, store.SCORES)  # not reached yet
    erased = store.erase(storage, lambda i: i == "x")
    assert sorted(erased.mlflow_tags) == ["runs/20250101T000000Z-abcdef-rum", "scores"]
    assert {f.split("/")[1] for f in storage.files(store.PREFIX)} == {store.REPORT}
    assert store.erase(storage, lambda i: i == "x") == store.Erased()


def test_staging_stays_in_the_state_folder_and_repair_removes_a_dead_writers(memory_url, tmp_path, monkeypatch):
    """Files bound for an object store are staged under <state>/.staging, never in the system's temp dir
    (erasure would not look there); a crash leaves them there, and repair removes a dead writer's folder."""
    from s3t_ops.files import TMP_MARK, remove_temporaries

    scratch = tmp_path / ".staging"
    storage = Storage(memory_url, scratch=scratch)
    seen = []

    def crash_on_first_put(rel, data):
        seen.extend(p.relative_to(tmp_path) for p in scratch.rglob("*") if p.is_file())
        raise Crash(rel)

    monkeypatch.setattr(storage, "write_bytes", crash_on_first_put)
    with pytest.raises(Crash):
        store.save_scores(storage, pd.DataFrame({"confidence": [0.5]}, index=["a"]), {"n_train": 1}, ["a"])
    assert seen and all(p.parts[0] == ".staging" for p in seen)  # staged inside the state folder
    assert not list(scratch.iterdir())  # an exception cleans up after itself
    dead = scratch / f"memorization-x{TMP_MARK}999999999"  # what a SIGKILL leaves: no live process has this pid
    live = scratch / f"memorization-y{TMP_MARK}{__import__('os').getpid()}"
    for d in (dead, live):
        d.mkdir()
        (d / store.IDS).write_text('["a"]')
    assert remove_temporaries(scratch) == [dead]
    assert not dead.exists() and live.exists()

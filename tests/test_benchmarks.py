"""The benchmark scripts run end to end at --quick sizes on the tiny BERT and toy data (figures are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import run_all
from tests.conftest import toy_frame


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-data") / "toy.csv"
    toy_frame(90).to_csv(path, index=False)
    return path


def test_all_benchmarks_quick_write_json_and_png(tmp_path, toy_source, tiny_backbone_dir):
    out = tmp_path / "results"
    summary = run_all.main(["--out", str(out), "--quick", "--quiet", "--source", str(toy_source), "--backbone", str(tiny_backbone_dir)])
    for name in run_all.BENCHMARKS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["machine"]["logical_cpus"]
        assert (out / f"{name}.png").stat().st_size > 5_000
    assert not any(p.name.startswith("state-") for p in out.iterdir())  # temporary states are removed

    rate = json.loads((out / "deletion_rate.json").read_text())
    assert all(abs(r["rel_error"]) < 0.1 for r in rate["rows"])  # 500 trials: loose

    work = json.loads((out / "deletion_workload.json").read_text())
    s = work["summary"]
    assert set(s) == {"s3t", "s3t-retrain", "sisa", "sisa-noretrain", "per-shard", "per-shard-noretrain", "full"}
    assert s["s3t"]["deletions_run"] == 4 and s["sisa"]["deletions_run"] == 2
    assert s["s3t"]["grad_example_steps_total"] == 0 and s["s3t-retrain"]["background_grad_example_steps_total"] > 0
    assert s["full"]["grad_example_steps_mean"] > 0 and s["sisa"]["grad_example_steps_mean"] > 0
    assert all(r["grad_example_steps"] == 0 for r in work["runs"]["s3t"])
    assert {t["target"] for t in work["targets"]} >= {"honour a deletion >= 100x faster than SISA"}

    acc = json.loads((out / "accuracy_zero.json").read_text())
    assert set(acc["summary"]) >= {"s3t", "sisa", "per-shard", "full", "majority"}
    train = json.loads((out / "training.json").read_text())
    assert train["max_abs_checkpoint_difference"] < 1e-3 and train["naive_seconds"] > 0
    serve = json.loads((out / "serving.json").read_text())
    assert all(p["max_abs_logit_difference"] < 1e-4 for p in serve["profiles"].values())
    assert set(summary["benchmarks"]) == set(run_all.BENCHMARKS)


@pytest.mark.parametrize("name", ["deletion_rate", "deletion_workload", "accuracy_zero", "training", "serving", "headline",
                                  "stage_ablation", "honour_latency", "prefix_depth", "run_all", "workers",
                                  "serving_load", "gpu_check", "scaling"])
def test_help_is_truthful(name):
    out = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--out" in out
    if name != "run_all":
        assert "--quick" in out and f"{name}.json" in out or name == "run_all"


def test_headline_quick_resumes_and_reports_both_comparisons(tmp_path, toy_source, tiny_backbone_dir, capsys):
    from benchmarks import headline

    out = tmp_path / "h"
    args = ["--out", str(out), "--quick", "--quiet", "--source", str(toy_source), "--backbone", str(tiny_backbone_dir),
            "--seeds", "0", "1", "--stream-seeds", "0", "--skewed-seeds", "1"]
    first = headline.main(args)
    assert first["seeds"] == [0, 1] and set(first["runs"]) == {"0", "1"}
    assert first["best_variant"] in headline.VARIANTS
    for key in ("best_minus_sisa_at_0", "capacity_ratio_vs_sisa", "lifetime_area_ratio_vs_sisa"):
        assert first[key]["n"] == 2 and len(first[key]["ci95"]) == 2 and len(first[key]["values"]) == 2
    for key in ("stream_acc_minus_sisa", "stream_night_steps_ratio_vs_sisa"):
        assert first[key]["n"] == 1
    assert first["stream_night_steps_ratio_vs_sisa"]["mean"] <= 1.0  # equal nightly compute: never more than SISA's
    assert first["stream_request_path_grad_example_steps"] == {"sisa": 0, first["stream_variant"]: 0}
    for seed, rec in first["runs"].items():
        per = first["per_seed"][seed]
        systems = rec["systems"]
        # the lifetime runs until the LAST system serves nothing; every system has a capacity (its death)
        assert per["lifetime_requests"] == max(v["capacity"] for k, v in systems.items() if k != "one_model")
        for key, sy in systems.items():
            if key == "one_model":
                continue
            assert sy["curve"][-1]["accuracy"] is None and len(sy["curve"]) == sy["capacity"] + 1
            assert all(r["grad_example_steps"] == 0 for r in sy["curve"])  # honoured without training
        # B = 1 is a view of the layered B = L checkpoints: never deeper, never alive longer
        for a, b in zip(systems["s3t_b1"]["curve"], systems["s3t"]["curve"]):
            assert all(a["depths"][s] <= b["depths"][s] for s in b["depths"])
        assert systems["s3t_b1"]["capacity"] <= systems["s3t"]["capacity"]
        assert systems["sisa"]["fit"]["shared_with"].startswith("sisa_eq")  # replica 0 of the equal-compute control
    assert "skewed" in first["per_seed"]["1"] and "skewed" not in first["per_seed"]["0"]
    assert (out / "headline.png").stat().st_size > 5_000
    stamp = (out / "headline.json").read_text()
    headline.main(args)  # resumes: every finished piece is kept, nothing retrained
    before, after = json.loads(stamp), json.loads((out / "headline.json").read_text())
    assert after["runs"] == before["runs"]
    assert len(after["machines"]) == len(before["machines"]) + 1
    merged = headline.main(["--out", str(tmp_path / "m"), "--quiet", "--merge", str(out)])  # another process's results
    assert merged["runs"] == after["runs"] and merged["best_variant"] == after["best_variant"]
    # one result never mixes trunk dtypes: a resume with the other one, or a merge of two, is refused
    assert after["trunk_dtype"] == merged["trunk_dtype"] == "float16"
    with pytest.raises(SystemExit) as refused:
        headline.main(args + ["--trunk-dtype", "float32"])
    assert refused.value.code == 2 and json.loads((out / "headline.json").read_text()) == after
    f32 = tmp_path / "f32"
    headline.main(["--out", str(f32), "--quick", "--quiet", "--source", str(toy_source), "--backbone", str(tiny_backbone_dir),
                   "--seeds", "0", "--systems", "sisa", "--workloads", "uniform", "--trunk-dtype", "float32"])
    assert json.loads((f32 / "headline.json").read_text())["trunk_dtype"] == "float32"
    assert json.loads((f32 / "state-headline" / "seed0" / "data" / "config.json").read_text())["trunk_dtype"] == "float32"
    with pytest.raises(SystemExit) as refused:
        headline.main(["--out", str(tmp_path / "m2"), "--quiet", "--merge", str(out), str(f32)])
    assert refused.value.code == 2 and "holds a run with a float32 trunk cache, the others a float16 one" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()  # nothing written, not even the --out folder


def test_prefix_depth_quick_measures_every_depth_and_keeps_no_state(tmp_path, toy_source, tiny_backbone_dir):
    from benchmarks import prefix_depth

    out = tmp_path / "p"
    res = prefix_depth.main(["--out", str(out), "--quick", "--quiet", "--source", str(toy_source), "--backbone", str(tiny_backbone_dir)])
    for key in ("s3t", "sisa"):
        sy = res["systems"][key]
        assert [r["depth"] for r in sy["by_depth"]] == list(range(1, res["slices"] + 1))
        assert [r["shards"] for r in sy["by_live_shards"]] == list(range(1, res["shards"] + 1))
        assert all(len(r["shard_acc"]) == res["shards"] for r in sy["by_depth"])
        # every shard at full depth is the same ensemble however it is reached
        assert sy["by_live_shards"][-1]["ensemble_acc"] == sy["by_depth"][-1]["ensemble_acc"]
        assert sy["grad_example_steps"] > 0
    assert json.loads((out / "prefix_depth.json").read_text())["n_eval"] == res["n_eval"] > 0
    assert (out / "prefix_depth.png").stat().st_size > 5_000 and not (out / "state-prefix_depth").exists()


def test_workers_quick_compares_one_worker_with_two_and_keeps_no_state(tmp_path, toy_source, tiny_backbone_dir):
    """The measured runs are real `s3t train` processes; their checkpoints are compared by lineage position."""
    from benchmarks import workers

    out = tmp_path / "w"
    res = workers.main(["--out", str(out), "--quick", "--quiet", "--workers", "2", "--source", str(toy_source),
                        "--backbone", str(tiny_backbone_dir)])
    assert [r["workers"] for r in res["train"]] == [1, 2]
    assert res["train"][0]["checkpoints"] == res["train"][1]["checkpoints"] == 2 * 2 * 2  # m * B * L
    assert res["checkpoints_identical"] is True and res["speedup"] > 0 and res["demo"] is None
    assert json.loads((out / "workers.json").read_text())["checkpoints_identical"] is True
    assert (out / "workers.png").stat().st_size > 5_000 and not (out / "state-workers").exists()


def test_workers_rejects_one_worker_before_any_training(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/workers.py", "--out", str(tmp_path), "--workers", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--workers must be at least 2" in proc.stderr
    assert not (tmp_path / "state-workers").exists()


def test_sisa_at_depth_is_a_copy_at_that_depth(tmp_path, toy_source, tiny_backbone_dir):
    from benchmarks.common import QUICK
    from s3t_ops.baselines import SISA, SharedData
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher

    cfg = S3TConfig(**{k: v for k, v in QUICK.items()}, lora_alpha=8, backbone=str(tiny_backbone_dir), state_dir=tmp_path / "s")
    engine = S3T.create(cfg, str(toy_source), progress=False, publisher=Publisher())
    engine.build_trunk()
    sisa = SISA(SharedData.from_engine(engine), retrain=False)
    sisa.fit()
    shallow = sisa.at_depth(1)
    assert set(shallow.depths().values()) == {1} and set(sisa.depths().values()) == {cfg.slices}
    assert shallow.at_depth(cfg.slices).depths() == shallow.depths()  # never deeper than what it holds
    with pytest.raises(ValueError, match="depth must be >= 1"):
        sisa.at_depth(0)


@pytest.mark.parametrize("flags,message", [
    (["--n-train", "40000"], "exceeds the"), (["--shards", "50", "--slices", "3", "--n-train", "100"], "m*L = 50*3"),
    (["--systems", "s3t", "nope"], "unknown system(s) nope"), (["--systems", "s3t_b1"], "list s3t too"),
    (["--days", "0"], "--days must be >= 1")])
def test_headline_flags_are_validated_before_any_training(tmp_path, flags, message):
    r = subprocess.run([sys.executable, "-m", "benchmarks.headline", "--out", str(tmp_path), *flags], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_stage_ablation_and_honour_latency_quick(tmp_path, toy_source, tiny_backbone_dir):
    from benchmarks import honour_latency, stage_ablation

    abl = stage_ablation.main(["--out", str(tmp_path), "--quick", "--quiet", "--source", str(toy_source), "--backbone",
                               str(tiny_backbone_dir), "--variants", "baseline", "no_refine+lr3e-3"])
    assert set(abl["variants"]) == {"baseline", "no_refine+lr3e-3"}
    assert "sisa" in abl["variants"]["no_refine+lr3e-3"]  # lr changes SISA too
    lat = honour_latency.main(["--out", str(tmp_path), "--quick", "--quiet", "--backbone", str(tiny_backbone_dir)])
    assert lat["summary"]["cli"]["n"] == 2 and all(r["champion_moved_s"] > 0 for r in lat["cli"])
    assert lat["bulk"]["deletions_in_one_transaction"] == lat["bulk"]["bulk_ids"] == 50


def test_trunk_size_quick_compares_layouts(tmp_path, tiny_backbone_dir):
    from benchmarks import trunk_size

    r = trunk_size.main(["--out", str(tmp_path), "--quick", "--quiet", "--backbone", str(tiny_backbone_dir)])
    rows = r["layouts"]
    assert rows["float32"]["block0_recomputed_equal"] is True
    # block 0 kept as token ids: one boundary fewer than the legacy layout; float16 halves the others
    assert rows["float32"]["bytes_per_example"] < rows["legacy"]["bytes_per_example"]
    assert rows["float16"]["bytes_per_example"] < 0.6 * rows["float32"]["bytes_per_example"]
    assert 0 < rows["float16"]["max_abs_error"] < 0.01 * rows["float16"]["max_abs_value"]
    assert (tmp_path / "trunk_size.png").stat().st_size > 5_000


def test_results_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The resumable benchmarks reread their JSON: a write cut short (a kill, a full disk) keeps the old results."""
    from pathlib import Path

    from benchmarks.common import write_json

    path = write_json(tmp_path, "bench", {"runs": {"0": 1}})
    before = path.read_text()

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(tmp_path, "bench", {"runs": {"0": 1, "1": 2}})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["bench.json"]

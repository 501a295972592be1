"""The benchmark scripts run end to end at --quick sizes on the tiny BERT and toy data (figures are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import run_all
from tests.conftest import toy_frame


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids spin-wait contention (2x faster here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.mark.parametrize("name", ["deletion_rate", "deletion_workload", "accuracy_zero", "training", "serving", "run_all"])
def test_help_is_truthful(name):
    out = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--out" in out
    if name != "run_all":
        assert "--quick" in out and f"{name}.json" in out or name == "run_all"

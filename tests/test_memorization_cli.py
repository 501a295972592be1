"""`s3t unlearn` on a tiny backbone: report labelled approximate, JSON in the state folder, MLflow runs, exit 2 on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s3t_ops.cli import main
from tests.conftest import toy_frame


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("unlearn-cli")
    data = root / "toy.csv"
    toy_frame(72).to_csv(data, index=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ["--shards", "2", "--slices", "2", "--budget", "2", "--epochs", "1", "--batch-size", "8", "--max-tokens", "16",
               "--lora-rank", "4", "--n-train", "0", "--n-val", "12", "--n-test", "12", "--backbone", str(tiny_backbone_dir)]
        assert main(["train", "--state", str(root / "state"), "--source", str(data), "--quiet", *cfg]) == 0
        yield root
    finally:
        torch.set_num_threads(threads)


def _runs(uri: str):
    from mlflow import MlflowClient

    from s3t_ops.memorization.service import EXPERIMENT

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def test_unlearn_rum_f_with_controls_over_two_seeds(tiny_state, capsys):
    state = tiny_state / "state"
    uri = f"sqlite:///{tiny_state / 'track.db'}"
    rc = main(["unlearn", "--state", str(state), "--method", "rum_f", "--proxy", "confidence", "--n-forget", "6", "--seeds", "2",
               "--epochs", "1", "--controls", "--tracking-uri", uri])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "APPROXIMATE unlearning" in out.out and "s3t forget" in out.out and "[" in out.out  # intervals over 2 seeds
    assert "approximate unlearning" in out.err  # the progress bar (stderr)
    report = json.loads(Path(out.out.split("report: ")[1].split()[0]).read_text())
    assert report["approximate"] is True and report["seeds"] == [0, 1] and report["n_forget"] == 6
    assert set(report["summary"]) == {"original", "oracle", "rum_f", "rum_f_shuffle", "vanilla"}
    for name, m in report["summary"].items():
        assert m["retain"]["n"] == 2 and m["retain"]["low"] <= m["retain"]["mean"] <= m["retain"]["high"]
        if name != "oracle":
            assert 0 <= m["tow"]["mean"] <= 1 and 0 <= m["tow_mia"]["mean"] <= 1
    assert Path(report["model"]).is_file() and Path(report["png"]).is_file()
    assert Path(report["json"]).parent.parent == state / "memorization" / "runs"
    # every variant of every seed is an MLflow run, tagged approximate, with the method, proxy and bins
    runs = [r for r in _runs(uri) if r.data.tags.get("s3t.unlearning_id") == report["id"]]
    assert len(runs) == 2 * 5 == report["mlflow"]["runs"]
    for r in runs:
        assert r.data.tags["s3t.kind"] == "approximate_unlearning" and r.data.tags["approximate"] == "true"
        assert r.data.params["proxy"] == "confidence" and "config" in r.data.params
        assert {"forget_accuracy", "retain_accuracy", "test_accuracy", "mia"} <= set(r.data.metrics)
        if r.data.tags["s3t.variant"] != "oracle":
            assert {"tow", "tow_mia"} <= set(r.data.metrics)
        if r.data.tags["s3t.variant"] == "rum_f":
            assert r.data.params["method"] == "neggrad_plus+neggrad_plus+neggrad_plus"
            assert sum(json.loads(r.data.params["bins"]).values()) == 6


def test_unlearn_single_method_from_an_id_file_without_oracle_json(tiny_state, capsys):
    from s3t_ops.engine import S3T

    state = tiny_state / "state"
    ids = S3T.open(state, progress=False).ledger.examples("train")["id"].tolist()[:4]
    f = tiny_state / "ids.csv"
    f.write_text("id\n" + "\n".join(ids) + "\n")
    rc = main(["unlearn", "--state", str(state), "--method", "salun", "--forget", str(f), "--epochs", "1", "--no-oracle",
               "--json", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["approximate"] is True and result["forget_ids"] == ids and result["primary"] == "salun"
    assert set(result["summary"]) == {"original", "salun"} and "tow" not in result["summary"]["salun"]
    assert result["png"] is None and Path(result["json"]).is_file()
    # the default tracking store lives in the state folder
    assert result["mlflow"]["tracking_uri"].endswith(str(state / "mlflow.db"))
    assert {r.data.tags["s3t.variant"] for r in _runs(result["mlflow"]["tracking_uri"])
            if r.data.tags.get("s3t.unlearning_id") == result["id"]} == {"original", "vanilla"}


@pytest.mark.parametrize("args, message", [
    (["--forget", "IDS"], "not live training examples"),
    (["--forget", "MISSING"], "no such file"),
    (["--forget", "NOCOL"], "`id` column"),
    (["--forget", "EMPTY"], "no ids"),
    (["--seeds", "0"], "--seeds"),
    (["--n-forget", "0"], "--n-forget"),
    (["--n-forget", "100000"], "forget set"),
])
def test_unlearn_bad_input_exits_2_with_one_line(tiny_state, capsys, args, message):
    files = {"IDS": "id\nnot-an-id\n", "NOCOL": "name\nx\n", "EMPTY": "id\n"}
    args = list(args)
    for i, a in enumerate(args):
        if a in files:
            path = tiny_state / f"{a.lower()}.csv"
            path.write_text(files[a])
            args[i] = str(path)
        elif a == "MISSING":
            args[i] = str(tiny_state / "missing.csv")
    before = sorted((tiny_state / "state").rglob("report.json"))
    rc = main(["unlearn", "--state", str(tiny_state / "state"), "--epochs", "1", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("s3t: error:") and message in err and len(err.strip().splitlines()) == 1
    assert sorted((tiny_state / "state").rglob("report.json")) == before  # nothing written


def test_unlearn_without_a_state_exits_2(tmp_path, capsys):
    assert main(["unlearn", "--state", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no S3T state" in capsys.readouterr().err


def test_tracker_logs_an_unlearning_run_always_tagged_approximate(tmp_path):
    from mlflow import MlflowClient

    from s3t_ops.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri, experiment="unlearn-test", artifact_root=str(tmp_path / "art"))
    run_id = tracker.log_unlearning("rum-seed0", {"method": "rum", "proxy": "confidence", "bins": '{"low": 1}'},
                                    {"tow": 0.9, "tow_mia": float("nan"), "mia": 0.5, "flag": True},
                                    tags={"s3t.kind": "stage", "approximate": "false", "s3t.seed": 0})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["s3t.kind"] == "approximate_unlearning" and run.data.tags["approximate"] == "true"  # not overridable
    assert run.data.tags["s3t.seed"] == "0" and run.data.params == {"method": "rum", "proxy": "confidence", "bins": '{"low": 1}'}
    assert run.data.metrics == {"tow": 0.9, "mia": 0.5}  # non-finite and non-numeric values are left out
    assert run.info.status == "FINISHED"


def test_mean_ci_and_summary_on_known_values():
    from s3t_ops.memorization.metrics import mean_ci, summarize

    ci = mean_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, df 2) = 4.302653
    assert ci["mean"] == pytest.approx(2.0) and ci["n"] == 3
    assert ci["high"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5) and ci["low"] == pytest.approx(4.0 - ci["high"])
    assert mean_ci([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}
    assert mean_ci([float("nan")])["n"] == 0
    s = summarize([{"rum": {"tow": 0.8, "seconds": 1.0}, "oracle": {"retain": 1.0}}, {"rum": {"tow": 0.6, "seconds": 3.0}}])
    assert s["rum"]["tow"]["mean"] == pytest.approx(0.7) and s["rum"]["seconds"]["n"] == 2 and s["oracle"]["retain"]["n"] == 1


def test_plan_variants_per_method():
    from s3t_ops.memorization.config import TUNED
    from s3t_ops.memorization.workflow import plan_variants

    assert plan_variants("rum") == (["original", "oracle", "rum"], "rum", None)
    assert plan_variants("rum_f", controls=True) == (["original", "oracle", "rum_f", "rum_f_shuffle", "vanilla"], "rum_f", None)
    variants, primary, vanilla = plan_variants("neggrad_plus", with_oracle=False)
    assert variants == ["original", "vanilla"] and primary == "vanilla" and vanilla == TUNED["neggrad_plus"]
    with pytest.raises(ValueError, match="unknown method"):
        plan_variants("forget_everything")


def test_unlearn_help_is_listed_and_says_approximate(capsys):
    from s3t_ops.memorization.config import UNLEARN_METHODS, UNLEARN_PROXIES

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "unlearn" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "APPROXIMATE" in out and "NOT changed" in out and "s3t forget" in out
    assert all(m in out for m in UNLEARN_METHODS) and all(p in out for p in UNLEARN_PROXIES)
    assert "(default 6)" in out and "(default rum)" in out  # the defaults shown are the config's

"""The bad-input catalogue: every case gives one line naming the problem, exit code 2, no traceback, and
leaves the state folder exactly as it was (every file hashed before and after); a failed `train` into a
new folder leaves no folder behind. Also: tampered checkpoints are detected and never served, and a
forget racing a training run leaves no checkpoint trained on the deleted example."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from s3t_ops.cli import main
from s3t_ops.engine import S3T
from tests.statecheck import copy_state, hash_tree, run_cli, tiny_world

TINY = ["--epochs", "1", "--batch-size", "8", "--max-tokens", "16", "--lora-rank", "4", "--n-train", "0", "--n-val", "8",
        "--n-test", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone_dir):
    """A trained state (MLflow registry in the folder) and input files, good and bad."""
    root = tmp_path_factory.mktemp("bad")
    cfg, data = tiny_world(root, tiny_backbone_dir, 60)
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    files = root / "files"
    files.mkdir()
    (files / "ids_no_column.csv").write_text("name\nabc\n")
    (files / "ids_blank.csv").write_text(f"id\n{engine.examples('train')['id'].iloc[0]}\n\n  \n", encoding="utf-8")
    (files / "ids_blank_cell.csv").write_text(f"id,note\n{engine.examples('train')['id'].iloc[0]},a\n,b\n")
    (files / "ids_latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (files / "empty.csv").write_text("")
    (files / "no_label.csv").write_text("text,category\nhello,1\n")
    (files / "latin1.csv").write_bytes("text,label\ncaf\xe9 au lait,pos\nbad day,neg\n".encode("latin-1"))
    (files / "blank_text.csv").write_text("text,label\nhello,pos\n,neg\n")
    (files / "one_class.csv").write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(30)))
    (files / "dup_ids.csv").write_text("id,text,label\na,x,pos\na,y,neg\n")
    (files / "data.json").write_text("{}")
    (files / "a_dir").mkdir()
    return {"root": root, "state": cfg.state_dir, "files": files, "data": data, "backbone": str(tiny_backbone_dir),
            "x": engine.examples("train")["id"].iloc[0]}


def _cases(w) -> dict[str, tuple[list[str], str]]:
    s, f, bb = str(w["state"]), w["files"], w["backbone"]
    new = str(w["root"] / "new-state")
    new_args = ["--state", new, "--backbone", bb, *TINY]
    cases = [
        # forget
        ("unknown id", ["forget", "--state", s, "no-such-id"], "1 unknown example id(s): no-such-id; nothing was deleted"),
        ("unknown among known", ["forget", "--state", s, w["x"], "nope"], "unknown example id(s): nope"),
        ("blank id argument", ["forget", "--state", s, "  "], "blank"),
        ("no ids at all", ["forget", "--state", s], "give example ids"),
        ("id file missing", ["forget", "--state", s, "--file", str(f / "missing.txt")], "no such file"),
        ("id file is a directory", ["forget", "--state", s, "--file", str(f / "a_dir")], "is a directory"),
        ("CSV without id column", ["forget", "--state", s, "--file", str(f / "ids_no_column.csv")], "needs an `id` column"),
        ("blank id cell", ["forget", "--state", s, "--file", str(f / "ids_blank_cell.csv")], "blank id on line(s) [3]"),
        ("empty CSV", ["forget", "--state", s, "--file", str(f / "empty.csv")], "not a readable CSV"),
        ("id file not UTF-8", ["forget", "--state", s, "--file", str(f / "ids_latin1.txt")], "not UTF-8"),
        ("--state is a file", ["forget", "--state", str(w["data"]), w["x"]], "is a file, not a folder"),
        ("--state missing", ["status", "--state", str(w["root"] / "nowhere")], "no S3T state in"),
        # train on an existing state
        ("flag differs from the state", ["train", "--state", s, "--shards", "3"], "--shards 3 differs from the state's shards=2"),
        ("lr differs from the state", ["train", "--state", s, "--lr", "0.5"], "--lr 0.5 differs"),
        ("--source on an existing state", ["train", "--state", s, "--source", str(w["data"])], "already ingested"),
        # train into a new folder (must leave nothing behind)
        ("source is a directory", ["train", *new_args, "--source", str(f / "a_dir")], "is a directory"),
        ("source missing", ["train", *new_args, "--source", str(f / "missing.csv")], "no such file"),
        ("source without label", ["train", *new_args, "--source", str(f / "no_label.csv")], "missing column(s) label"),
        ("source not UTF-8", ["train", *new_args, "--source", str(f / "latin1.csv")], "not UTF-8 text"),
        ("source with a blank text", ["train", *new_args, "--source", str(f / "blank_text.csv")], "empty text or label"),
        ("source with one class", ["train", *new_args, "--source", str(f / "one_class.csv")], "need at least two classes"),
        ("source with duplicate ids", ["train", *new_args, "--source", str(f / "dup_ids.csv")], "duplicate id(s)"),
        ("source of unknown type", ["train", *new_args, "--source", str(f / "data.json")], "unsupported file type .json"),
        ("more groups than blocks", ["train", *new_args, "--source", str(w["data"]), "--slices", "7", "--budget", "1"],
         "slices: L=7 groups need at least 7 transformer blocks"),
        ("more tokens than positions", ["train", *new_args, "--source", str(w["data"]), "--max-tokens", "5000"],
         "max_tokens: 5000 exceeds the backbone's 64 positions"),
        ("budget above L for cyclic", ["train", *new_args, "--source", str(w["data"]), "--budget", "5", "--slices", "3"],
         "budget: cyclic selection allows at most slices=3"),
        ("zero shards", ["train", *new_args, "--source", str(w["data"]), "--shards", "0"], "shards: must be a positive integer"),
        ("backbone folder without a model", ["train", "--state", new, "--backbone", str(f / "a_dir"), "--source", str(w["data"])],
         "holds no config.json"),
        ("demo over an existing state", ["demo", "--state", s], "--fresh"),
        ("demo --fresh with a bad flag", ["demo", "--state", s, "--fresh", "--shards", "-1"], "shards: must be a positive integer"),
        ("unlearn with an empty forget set", ["unlearn", "--state", s, "--n-forget", "0"], "--n-forget must be >= 1"),
    ]
    return {name: (args, message) for name, args, message in cases}


CASES = ["unknown id", "unknown among known", "blank id argument", "no ids at all", "id file missing", "id file is a directory",
         "CSV without id column", "blank id cell", "empty CSV", "id file not UTF-8", "--state is a file", "--state missing",
         "flag differs from the state", "lr differs from the state", "--source on an existing state", "source is a directory",
         "source missing", "source without label", "source not UTF-8", "source with a blank text", "source with one class",
         "source with duplicate ids", "source of unknown type", "more groups than blocks", "more tokens than positions",
         "budget above L for cyclic", "zero shards", "backbone folder without a model", "demo over an existing state",
         "demo --fresh with a bad flag", "unlearn with an empty forget set"]


def test_the_catalogue_is_large_enough(world):
    assert sorted(_cases(world)) == sorted(CASES) and len(CASES) >= 25


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, name, capsys):
    args, message = _cases(world)[name]
    before = hash_tree(world["state"])
    assert main(args) == 2, name
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3t: error: "), (name, out.err)
    assert message in lines[0], (name, lines[0])
    assert "Traceback" not in out.err
    assert hash_tree(world["state"]) == before, name
    assert not (world["root"] / "new-state").exists(), name
    assert not list(world["root"].glob(".new-state.creating-*")), name


def test_a_damaged_ledger_is_reported_and_left_alone(world, tmp_path, capsys):
    state = copy_state(world["state"], tmp_path / "s")
    ledger = state / "ledger.duckdb"
    ledger.write_bytes(ledger.read_bytes()[: ledger.stat().st_size // 2])
    before = hash_tree(state)
    for args in (["predict", "--state", str(state), "hello"], ["forget", "--state", str(state), world["x"]],
                 ["status", "--state", str(state)], ["train", "--state", str(state)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is damaged" in err[0] and "restore it from a backup" in err[0], err
        assert hash_tree(state) == before


def test_a_missing_tombstone_key_or_config_is_reported(world, tmp_path, capsys):
    state = copy_state(world["state"], tmp_path / "s")
    (state / "secret.key").unlink()
    before = hash_tree(state)
    assert main(["forget", "--state", str(state), world["x"]]) == 2
    assert "secret.key is missing" in capsys.readouterr().err
    assert hash_tree(state) == before
    state2 = copy_state(world["state"], tmp_path / "s2")
    (state2 / "config.json").write_text("{not json")
    assert main(["status", "--state", str(state2)]) == 2
    assert "config.json is damaged" in capsys.readouterr().err


def test_a_tracking_uri_other_than_the_states_registry_is_refused_before_any_write(world, tmp_path):
    state = copy_state(world["state"], tmp_path / "s")
    before = hash_tree(state)
    r = run_cli(["forget", "--state", str(state), world["x"]], MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert r.returncode == 2 and "MLFLOW_TRACKING_URI is http://127.0.0.1:9" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert hash_tree(state) == before


# --- tampering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["body", "header"])
def test_a_tampered_served_checkpoint_is_detected_never_served_and_retrained(world, tmp_path, capsys, where):
    state = copy_state(world["state"], tmp_path / "s")
    engine = S3T.open(state, progress=False)
    served = engine.served()[1]["checkpoints"]
    shard, keys = sorted(served.items())[0]
    key = keys[-1]
    path = engine.checkpoints.path(key)
    original = path.read_bytes()
    data = bytearray(original)
    if where == "body":
        for i in range(len(data) - 64, len(data)):  # 64 flipped bytes in the tensors
            data[i] ^= 0xFF
    else:
        data[0:8] = b"\xff" * 8  # a damaged safetensors header
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"checkpoint file {path} is damaged"):
        engine.load_checkpoint(key)  # a direct load names the file
    assert main(["predict", "--state", str(state), "a lovely day"]) == 0
    out = capsys.readouterr()
    assert f"checkpoint file {path} is damaged" in out.err and "will retrain and is not served" in out.err
    engine = S3T.open(state, progress=False)
    now_served = {k for ks in engine.served()[1]["checkpoints"].values() for k in ks}
    assert key not in now_served and not path.exists()
    assert engine.audit() == {}
    assert key in {s.key for s in engine.missing_stages()}
    engine.retrain()
    assert path.read_bytes() == original  # retrained bit for bit, served again
    assert key in {k for ks in engine.served()[1]["checkpoints"].values() for k in ks}


# --- a forget racing a training run ----------------------------------------------------------------
@pytest.mark.timeout(600)
def test_forget_while_train_runs_leaves_no_checkpoint_trained_on_the_deleted_example(world, tmp_path):
    import subprocess
    import sys

    from tests.statecheck import ROOT, cli_env

    state = copy_state(world["state"], tmp_path / "s")
    engine = S3T.open(state, progress=False)
    engine.forget([world["x"]])  # stages now await retraining
    first = engine.missing_stages()[0]
    members = engine.ledger.members(first.shard, first.prefix[0])["id"].tolist()
    y = members[0]
    release = tmp_path / "release"
    code = "import sys; from s3t_ops.cli import main; sys.exit(main(sys.argv[1:]))"
    trainer = subprocess.Popen([sys.executable, "-c", code, "train", "--state", str(state), "--quiet"], cwd=ROOT,
                               env=cli_env(S3T_PAUSE_AT=f"before_checkpoint_record:{release}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not Path(str(release) + ".reached").exists():  # the trainer holds a stage trained on y
            assert trainer.poll() is None, trainer.communicate()
            assert time.monotonic() < deadline, "the trainer never reached the pause point"
            time.sleep(0.05)
        r = run_cli(["forget", "--state", str(state), y])
        assert r.returncode == 0, r.stderr
        release.touch()
        out, err = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, err
        # every stage that held y's slice when y was deleted (one per worker paused there, at least the one waited
        # for) is discarded, never recorded
        assert int(re.search(r"discarded (\d+) stage\(s\) trained on data deleted meanwhile", out).group(1)) >= 1, out
    finally:
        if trainer.poll() is None:
            trainer.kill()
    engine = S3T.open(state, progress=False)
    tomb = engine.ledger.tombstone(y)
    rows = engine.checkpoint_rows()
    assert not [k for k in rows if tomb in engine.ledger.lineage(k)]  # 0 checkpoints trained on y remain
    assert engine.checkpoints.keys_on_disk() == set(rows)
    assert engine.audit() == {} and engine.missing_stages() == []
    d = engine.ledger.deletions()
    assert d["retrained_at"].notna().all()  # stamped only once nothing awaits retraining
    shutil.rmtree(state)

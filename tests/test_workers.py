"""Every core, and the device: parallel training equals one process byte for byte; `--device cpu` trains the bytes the
release before it trained; device selection refuses a GPU that is not there with one line."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.publish import Publisher
from tests.conftest import SHARED_SECRET
from tests.statecheck import run_cli, tiny_world

# sha256 of every checkpoint file, by (shard, sequence, stage), of the tiny world below trained by the release before
# devices and workers existed (commit 38d8e5c, one torch thread): what `--device cpu` must still train
BEFORE = {
    "0-0-1": "d5ea179644a98b326c8616392d396bda86692771a26380461f2934fa26189f3a",
    "0-0-2": "b564e0aae9ad98432543160a92343438cfbdf26542e6cc652be57be48f042fad",
    "0-1-1": "caac71e248874e3ab0da3760eab13bda404b95a9d0e8656aa58bd31f22bc39e9",
    "0-1-2": "97fee0572e087ce3480908a2340b19c3881db5f8281fc080844cd28517936381",
    "1-0-1": "c0a93132f65d7ca6f8397dfcb8d1ea9158b560132ed1dfc25d1254d3ee8b3398",
    "1-0-2": "55f32bf4b8e62167a784efd86a48d886b91292a062504eff0248f79fe8a28d6c",
    "1-1-1": "be4cc288a390ec6dc679b06b60ab6707c7b190a6d5810c70a117bb246ac2be4f",
    "1-1-2": "3d88c519ca3fadbcb4360118d6b36ec380b7262b639de0d5157c36343125b1ba"
}


def _files(engine: S3T) -> dict[str, bytes]:
    return {f"{s.shard}-{s.seq}-{s.stage}": engine.checkpoints.path(s.key).read_bytes() for s in engine.stage_specs()}


def test_workers_train_the_bytes_one_process_trains_and_cpu_those_of_the_release_before(tmp_path, tiny_backbone_dir):
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 60, state="one", device="cpu")
    one = S3T.create(cfg, data, progress=False, publisher=Publisher(), secret=SHARED_SECRET)
    one.fit(workers=1)
    two = S3T.create(cfg.replace(state_dir=tmp_path / "two"), data, progress=False, publisher=Publisher(), secret=SHARED_SECRET)
    report = two.fit(workers=2)
    assert len(report.trained) == 8 and two.served()[1] == one.served()[1]
    assert _files(one) == _files(two)  # byte for byte, trunk cache included
    for name in ("train-s0-j0.safetensors", "val.safetensors"):
        assert (one.root / "trunk" / name).read_bytes() == (two.root / "trunk" / name).read_bytes()
    assert {k: hashlib.sha256(v).hexdigest() for k, v in _files(one).items()} == BEFORE
    # a forget, then retraining in two workers: still the bytes of one process, and of a scratch run without the example
    victim = one.examples("train")["id"].iloc[0]
    for engine in (one, two):
        engine.forget([victim])
    one.retrain(workers=1)
    two.retrain(workers=2)
    assert _files(one) == _files(two) and one.missing_stages() == two.missing_stages() == []


def test_cuda_asked_for_and_absent_is_one_line_exit_2(tmp_path, tiny_backbone_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: cuda was asked for, but torch finds no GPU here"):
        S3TConfig(device="cuda").resolved()
    assert S3TConfig(device="auto").resolved().device == "cpu"
    assert S3TConfig(device="cpu").training_fingerprint() == S3TConfig().training_fingerprint()  # cpu keeps today's keys
    assert S3TConfig(device="cuda").training_fingerprint() != S3TConfig().training_fingerprint()  # a GPU's bits differ
    r = run_cli(["train", "--state", str(tmp_path / "s"), "--device", "cuda", "--backbone", str(tiny_backbone_dir)],
                CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "s3t: error: device: cuda was asked for, but torch finds no GPU here (use --device cpu or auto)"]
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="device: must be one of auto, cpu, cuda"):
        S3TConfig(device="tpu")


def test_a_dead_unreaped_writer_is_not_alive():
    """A pool worker killed with its command is a zombie until someone reaps it: its temporaries are a dead writer's
    (repair removes them), not a live one's."""
    import subprocess
    import sys
    import time

    from s3t_ops.files import alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not alive(child.pid)  # exited, not reaped
    finally:
        child.wait(timeout=30)
    assert alive(__import__("os").getpid())

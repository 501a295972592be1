"""Every core, and the device: parallel training equals one process byte for byte; `--device cpu` and `auto` (no GPU)
keep the checkpoint keys of the release before devices existed and train the same bytes; device selection refuses a
GPU that is not there with one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.publish import Publisher
from tests.conftest import SHARED_SECRET
from tests.statecheck import run_cli, tiny_world

# the training fingerprint (part of every checkpoint key) of the default config in the release before devices and
# workers existed (commit 38d8e5c): `--device cpu` and `auto` without a GPU must keep every key of that release. Its
# checkpoint *bytes* are not pinned here: float kernels differ between CPU models (AVX2 vs AVX-512, another EPYC), so a
# sha256 taken on one machine fails on another; bit-for-bit claims are made between runs on the same machine.
FINGERPRINT_BEFORE = "9cbcba2d7f23c2de"


def _files(engine: S3T) -> dict[str, bytes]:
    return {f"{s.shard}-{s.seq}-{s.stage}": engine.checkpoints.path(s.key).read_bytes() for s in engine.stage_specs()}


def test_workers_train_the_bytes_one_process_trains_and_cpu_those_of_the_release_before(tmp_path, tiny_backbone_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = S3TConfig(trunk_dtype="float32")  # that release's trunk (the default is float16 since)
    assert before.training_fingerprint() == before.replace(device="cpu").training_fingerprint() == FINGERPRINT_BEFORE
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 60, state="one", device="cpu")
    one = S3T.create(cfg, data, progress=False, publisher=Publisher(), secret=SHARED_SECRET)
    one.fit(workers=1)
    # the second world asks for `auto` (no GPU here): same keys, same bytes as `cpu`, in two workers
    two = S3T.create(cfg.replace(state_dir=tmp_path / "two", device="auto"), data, progress=False, publisher=Publisher(),
                     secret=SHARED_SECRET)
    report = two.fit(workers=2)
    assert len(report.trained) == 8 and two.served()[1] == one.served()[1]
    assert _files(one) == _files(two)  # byte for byte, trunk cache included
    for name in ("train-s0-j0.safetensors", "val.safetensors"):
        assert (one.root / "trunk" / name).read_bytes() == (two.root / "trunk" / name).read_bytes()
    assert [s.key for s in one.stage_specs()] == [s.key for s in two.stage_specs()]
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


def _spec(shard: int, seq: int, stage: int, parent: str | None):
    from s3t_ops.training import StageSpec

    return StageSpec(shard, seq, tuple(range(stage)), f"{shard}-{seq}-{stage}", parent, ("v",) * stage, 0)


def test_the_pool_starts_a_stage_when_its_parent_is_done_and_skips_what_sits_below_an_unrecorded_parent(monkeypatch):
    """The scheduler alone (threads stand in for worker processes): no barrier between depths, never more stages in
    flight than workers, a child never before its parent, and the chain below a stage a deletion discarded is left for
    the next round (skipped), not trained on a parent that was never recorded."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from s3t_ops import training

    # two chains of 3 stages; chain 0's stage 1 is slow, chain 1's stage 2 is discarded (a deletion came in)
    todo = []
    for chain in (0, 1):
        parent = None
        for stage in (1, 2, 3):
            todo.append(_spec(0, chain, stage, parent))
            parent = todo[-1].key
    lock, log, in_flight = threading.Lock(), [], [0, 0]

    def fake_train(key):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            log.append(("start", key))
        time.sleep(1.0 if key == "0-0-1" else 0.02)
        with lock:
            in_flight[0] -= 1
            log.append(("end", key))
        return key, ("discarded", 0) if key == "0-1-2" else ("trained", 5)

    monkeypatch.setattr(training, "_train", lambda key: (lambda r: (r[0], *r[1]))(fake_train(key)))
    monkeypatch.setattr(training, "pool", lambda state, workers: ThreadPoolExecutor(max_workers=workers))

    class _State:
        def forget_rows(self):
            pass

    steps = []
    out = training.run_stages(_State(), todo, workers=2, progress=steps.append)
    assert {spec.key: outcome for spec, outcome, _ in out} == {
        "0-0-1": "trained", "0-0-2": "trained", "0-0-3": "trained", "0-1-1": "trained", "0-1-2": "discarded",
        "0-1-3": "skipped"}
    assert [spec.key for spec, _, _ in out] == [s.key for s in todo]  # in the order asked
    assert in_flight[1] == 2 and sorted(steps) == [0, 5, 5, 5, 5]  # one per stage that ran
    starts = [k for what, k in log if what == "start"]
    assert "0-1-3" not in starts
    for spec in todo:  # a child starts only after its parent ended
        if spec.parent_key and spec.key in starts:
            assert log.index(("end", spec.parent_key)) < log.index(("start", spec.key))
    # no barrier: chain 1 went on to its stage 2 while chain 0's slow stage 1 was still running
    assert log.index(("start", "0-1-2")) < log.index(("end", "0-0-1"))

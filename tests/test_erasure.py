"""Erasure reaches everything a deleted example left: memorization artifacts (a model trained on it, id
lists) and their MLflow runs are hard-deleted by the forget itself, idempotently; traces() finds nothing."""
from __future__ import annotations

import pytest

from s3t_ops.config import S3TConfig
from s3t_ops.engine import S3T
from s3t_ops.erasure import erase_pending, traces
from s3t_ops.serving import plan_in
from tests.conftest import toy_frame
from tests.statecheck import byte_scan

pytestmark = pytest.mark.timeout(600)


def test_forget_erases_memorization_artifacts_and_their_runs(tmp_path, tiny_backbone_dir):
    import torch
    from mlflow.entities import ViewType

    from s3t_ops.memorization.config import MemorizationConfig
    from s3t_ops.memorization.service import unlearn_command

    torch.set_num_threads(1)
    data = tmp_path / "toy.csv"
    toy_frame(60).to_csv(data, index=False)
    cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
                    n_train=None, n_val=8, n_test=8, backbone=str(tiny_backbone_dir), state_dir=tmp_path / "state")
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    for s in range(2):
        for j in range(2):
            engine.materialize_slice(s, j)
    unlearn_command(engine.root, method="neggrad_plus", n_forget=3, with_oracle=False,
                    mcfg=MemorizationConfig(epochs=1, lr=5e-3, batch_size=8))
    mem = engine.root / "memorization"
    assert any(p.name.startswith("original-") for p in mem.iterdir()) and list((mem / "runs").iterdir())
    tracker = engine.publisher.tracker

    def memorization_runs():
        exps = [e.experiment_id for e in tracker.client.search_experiments(view_type=ViewType.ALL)]
        return tracker.client.search_runs(exps, "tags.`s3t.memorization_artifact` != ''", run_view_type=ViewType.ALL)

    assert memorization_runs()
    victim = engine.examples("train").iloc[0]
    engine.forget([victim["id"]])
    # every artifact built from the victim is gone, and so are the runs that described them
    leftovers = [p for p in mem.rglob("*") if p.is_file()]
    assert leftovers == []
    assert memorization_runs() == []
    assert byte_scan(engine.root, [victim["text"], victim["id"]]) == []
    assert traces(engine.state) == {}
    assert engine.ledger.pending_erasure() == set()
    assert erase_pending(engine.state).pending == 0  # idempotent: nothing left to do


def test_traces_finds_rows_that_erasure_has_not_removed_yet(tmp_path, tiny_backbone_dir):
    import torch

    torch.set_num_threads(1)
    data = tmp_path / "toy.csv"
    toy_frame(48).to_csv(data, index=False)
    cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, max_tokens=16, lora_rank=4, lora_alpha=8,
                    n_train=None, n_val=6, n_test=6, backbone=str(tiny_backbone_dir), state_dir=tmp_path / "state")
    from s3t_ops.publish import Publisher

    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    engine.build_trunk()
    engine.materialize_slice(0, 0)
    victim = engine.ledger.members(0, 0)["id"].iloc[0]
    engine.ledger.honour([victim], plan_in(engine.state))  # honoured, not yet erased (as after a crash)
    found = traces(engine.state)
    assert set(found) == {str(engine.root / "trunk" / "train-s0-j0.safetensors"), str(engine.root / "slices" / "s0-j0.parquet")}
    assert all(n == 1 for n in found.values())
    erase_pending(engine.state)
    assert traces(engine.state) == {} and engine.ledger.pending_erasure() == set()

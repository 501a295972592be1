"""Baselines on the tiny random BERT: costs, exactness (retrained == trained without the example), fairness."""
from __future__ import annotations

import math

import pytest
import torch

from s3t_ops.baselines import SISA, FullRetrain, PerShardLoRA, S3TSystem, SharedData, aggregate, train_stage_naive
from tests.oracles import split_full_state
from s3t_ops.engine import S3T
from s3t_ops.publish import Publisher
from s3t_ops.stages import train_stage
from tests.conftest import toy_frame


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def _setup(tmp_path, tiny_config, **changes):
    path = tmp_path / "toy.csv"
    toy_frame(60).to_csv(path, index=False)
    cfg = tiny_config(epochs=1, n_val=6, n_test=12, **changes)
    engine = S3T.create(cfg, path, progress=False, publisher=Publisher())
    engine.build_trunk()
    return engine, SharedData.from_engine(engine)


@pytest.fixture
def setup(tmp_path, tiny_config):
    """An ingested S3T state (m=2, L=2, B=2) with its trunk, and the shared data view of the baselines."""
    return _setup(tmp_path, tiny_config)


@pytest.fixture
def setup32(tmp_path, tiny_config):
    """The same with a float32 trunk cache, which stores the frozen states exactly."""
    return _setup(tmp_path, tiny_config, trunk_dtype="float32")


def _by_cell(data: SharedData) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for i in data.train.ids:
        out.setdefault(data.cells[i], []).append(i)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_shared_data_is_the_engine_snapshot(setup):
    engine, data = setup
    train = engine.ledger.examples("train")
    assert set(data.train.ids) == set(train["id"]) == set(data.cells)
    assert data.num_labels == 3 and len(data.evals["test"]) == 12
    with pytest.raises(KeyError, match="not training examples"):
        data.take(["nope"], set(data.cells))


def test_sisa_stages_checkpoints_are_s3t_identity_sequence(setup):
    """SISA with S3T's stage model is S3T's identity sequence: same checkpoints, bit for bit on CPU."""
    engine, data = setup
    s3t = S3TSystem(engine)
    s3t.fit()
    sisa = SISA(data, model="stages")
    rep = sisa.fit()
    assert rep.models == data.shards * data.slices
    assert engine.sequences[0] == (0, 1)
    for spec in engine.stage_specs():
        if spec.seq == 0:
            assert _same(engine.load_checkpoint(spec.key), sisa.ckpts[spec.shard][spec.stage - 1])


def test_sisa_retrains_from_the_checkpoint_before_the_slice_in_that_shard_only(setup):
    engine, data = setup
    sisa = SISA(data, model="full")
    fit = sisa.fit()
    cells = _by_cell(data)
    assert fit.grad_example_steps == sum(len(cells[(s, 0)]) + len(cells[(s, 0)]) + len(cells[(s, 1)]) for s in range(2))
    before = [[dict(c) for c in shard] for shard in sisa.ckpts]

    victim = cells[(1, 1)][0]  # shard 1, second slice: checkpoint 1 stays, checkpoint 2 retrains
    cost = sisa.forget([victim])
    assert cost.grad_example_steps == len(cells[(1, 0)]) + len(cells[(1, 1)]) - 1 and cost.retrained == 1
    assert cost.seconds > 0 and cost.background_grad_example_steps == 0
    assert _same(sisa.ckpts[1][0], before[1][0]) and not _same(sisa.ckpts[1][1], before[1][1])
    assert all(_same(a, b) for a, b in zip(sisa.ckpts[0], before[0]))

    victim0 = cells[(0, 0)][0]  # first slice: retrain everything of shard 0 from scratch
    cost = sisa.forget([victim0])
    assert cost.retrained == 2 and cost.grad_example_steps == 2 * (len(cells[(0, 0)]) - 1) + len(cells[(0, 1)])
    assert sisa.depths() == {0: 2, 1: 2}
    assert 0.0 <= sisa.evaluate() <= 1.0

    # exactness: the retrained SISA equals a SISA trained without those examples from the start
    oracle = SISA(data, model="full")
    oracle.live -= {victim, victim0}
    oracle.fit()
    for s in range(2):
        for a, b in zip(sisa.ckpts[s], oracle.ckpts[s]):
            assert _same(a, b)
    assert sisa.forget([victim]).grad_example_steps == 0  # already forgotten: nothing to do


def test_sisa_without_retraining_falls_back_or_dies(setup):
    engine, data = setup
    cells = _by_cell(data)
    sisa = SISA(data, retrain=False, model="stages", aggregation="vote")
    sisa.fit()
    acc0 = sisa.evaluate()
    cost = sisa.forget([cells[(0, 1)][0]])
    assert cost.grad_example_steps == 0 and sisa.depths() == {0: 1, 1: 2}
    assert sisa.ckpts[0][1] is None  # the checkpoint that saw it is gone
    assert 0.0 <= sisa.evaluate() <= 1.0 and not math.isnan(acc0)
    sisa.forget([cells[(0, 0)][0]])
    assert sisa.depths() == {0: 0, 1: 2} and sisa.live_models() == 1
    sisa.forget([cells[(1, 0)][0]])
    assert math.isnan(sisa.evaluate())  # nothing left to serve

    kill = SISA(data, retrain=False, fallback="kill")
    kill.fit()
    kill.forget([cells[(1, 1)][0]])
    assert kill.depths() == {0: 2, 1: 0}


def test_full_retrain_retrains_everything_and_equals_training_without_the_example(setup):
    engine, data = setup
    full = FullRetrain(data)
    fit = full.fit()
    n = len(data.cells)
    assert fit.grad_example_steps == n and fit.models == 1
    victim = data.train.ids[3]
    cost = full.forget([victim])
    assert cost.grad_example_steps == n - 1 and cost.retrained == 1
    oracle = FullRetrain(data)
    oracle.live.discard(victim)
    oracle.fit()
    assert _same(full.state, oracle.state)
    loras, head = split_full_state(full.state, data.slices)
    assert len(loras) == data.slices and all(loras) and set(head) == {"weight", "bias"}
    assert 0.0 <= full.evaluate("val") <= 1.0


def test_per_shard_lora_retrains_only_the_affected_shard(setup):
    engine, data = setup
    cells = _by_cell(data)
    ps = PerShardLoRA(data)
    ps.fit()
    other = dict(ps.models[1])
    victim = cells[(0, 1)][0]
    cost = ps.forget([victim])
    assert cost.grad_example_steps == len(cells[(0, 0)]) + len(cells[(0, 1)]) - 1
    assert _same(ps.models[1], other)
    dead = PerShardLoRA(data, retrain=False)
    dead.fit()
    assert dead.forget([victim]).grad_example_steps == 0 and dead.depths() == {0: 0, 1: 1}


def test_s3t_system_honours_without_gradient_steps_and_retrains_by_policy(setup, tmp_path):
    engine, data = setup
    cells = _by_cell(data)
    s3t = S3TSystem(engine)
    fit = s3t.fit()
    assert fit.models == 2 * 2 * 2
    eager = s3t.clone(tmp_path / "eager", retrain_every=1)
    acc0 = s3t.evaluate()
    assert eager.evaluate() == acc0

    victim = cells[(0, 1)][0]
    cost = s3t.forget([victim])
    assert cost.grad_example_steps == 0 and cost.background_grad_example_steps == 0 and cost.seconds > 0
    assert 0 < cost.details["planner_seconds"] < cost.seconds  # the pure serving decision is part of the honour path
    assert s3t.depths() == {0: 1, 1: 2}  # cyclic B=2: slice 1 is last in sequence 0

    cost = eager.forget([victim])
    assert cost.grad_example_steps == 0 and cost.background_grad_example_steps > 0 and cost.retrained == 2 + 1
    assert eager.depths() == {0: 2, 1: 2}
    assert not eager.engine.audit() and not s3t.engine.audit()
    assert s3t.engine.ledger.is_deleted(victim) and eager.engine.ledger.is_deleted(victim)


def test_aggregate_mean_and_vote():
    a = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert aggregate([a, b, c], "mean").tolist() == [0, 1]
    assert aggregate([a, b, c], "vote").tolist() == [1, 1]
    assert aggregate([a, c], "vote").tolist() == [0, 0]  # 1-1 ties broken by the averaged softmax
    with pytest.raises(ValueError):
        aggregate([a], "median")


def test_naive_stage_training_equals_trunk_stage_training(setup32):
    """The trunk shortcut is exact with a float32 cache: a stage trained with full forwards gives the same checkpoint.
    (float16, the default, rounds the stored states to within 4e-3; tests/test_ensemble.py bounds what that changes.)"""
    engine, data = setup32
    bb = data.backbone
    ids = data.ids_in(set(data.cells), shard=0)
    labels = data.label_tensor(ids)
    ex = engine.ledger.examples("train").set_index("id").loc[ids]
    input_ids, mask = bb.tokenize(ex["text"].tolist())
    s1 = train_stage(bb, data.train, ids, labels, 1, [], 11, data.num_labels)
    n1 = train_stage_naive(bb, input_ids, mask, ids, labels, 1, [], 11, data.num_labels)
    assert n1.grad_example_steps == s1.grad_example_steps
    assert all(torch.allclose(n1.state[k], s1.state[k], atol=1e-5) for k in s1.state)
    s2 = train_stage(bb, data.train, ids, labels, 2, [s1.state], 12, data.num_labels)
    n2 = train_stage_naive(bb, input_ids, mask, ids, labels, 2, [n1.state], 12, data.num_labels)
    assert all(torch.allclose(n2.state[k], s2.state[k], atol=1e-4) for k in s2.state)

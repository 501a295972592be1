"""Retraining policies: which stale chains a run retrains (pure), and the engine following them (exact, resumable)."""
from __future__ import annotations

import pytest

from s3t_ops.engine import S3T
from s3t_ops.policy import select_chains
from s3t_ops.publish import Publisher
from tests.statecheck import tiny_world


def test_all_takes_every_chain_cheapest_first_per_shard():
    costs = {(0, 0): 30, (0, 1): 10, (0, 2): 20, (1, 1): 5}
    assert select_chains(costs, "all") == [(1, 1), (0, 1), (0, 2), (0, 0)]  # rank in shard, then cost


def test_cheapest_takes_one_chain_per_shard():
    costs = {(0, 0): 30, (0, 1): 10, (0, 2): 20, (1, 0): 7, (1, 1): 5}
    assert select_chains(costs, "cheapest") == [(1, 1), (0, 1)]


def test_a_budget_caps_the_run_and_skips_a_chain_that_does_not_fit():
    costs = {(0, 0): 30, (0, 1): 10, (1, 0): 25, (1, 1): 5}
    assert select_chains(costs, "all", budget=20) == [(1, 1), (0, 1)]  # 5 + 10; 25 and 30 do not fit in what is left
    assert select_chains(costs, "all", budget=40) == [(1, 1), (0, 1), (1, 0)]  # 25 fits the 25 left; 30 does not
    assert select_chains(costs, "cheapest", budget=0) == []
    assert select_chains({}, "all") == []


@pytest.mark.parametrize("policy,budget,message", [("fastest", None, "policy must be one of all, cheapest"),
                                                    ("all", -1, "budget must be >= 0")])
def test_bad_policies_are_refused(policy, budget, message):
    with pytest.raises(ValueError, match=message):
        select_chains({(0, 0): 1}, policy, budget)


def test_the_engine_retrains_the_cheapest_chain_and_serves_it_at_full_depth(tmp_path, tiny_backbone_dir, one_torch_thread):
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 60, stage_model="full_depth")
    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    engine.fit()
    train = engine.examples("train")
    victim = train[(train["shard"] == 0) & (train["slice"] == 0)]["id"].iloc[0]
    engine.forget([victim])
    chains = engine.stale_chains()
    # slice 0 is first in sequence (0, 1) and last in (1, 0): the cheapest chain redoes the last stage only
    assert set(chains) == {(0, 0), (0, 1)}
    costs = engine.chain_costs(chains)
    assert costs[(0, 1)] < costs[(0, 0)]
    report = engine.retrain(policy="cheapest")
    assert [(s.shard, s.seq, s.stage) for s in report.trained] == [(0, 1, 2)] and report.deferred == 1
    assert report.grad_example_steps == costs[(0, 1)]
    plan = engine.served_plan()
    assert {c.shard: (c.seq, c.depth) for c in plan.choices}[0] == (1, 2)  # the shard serves full depth again
    assert engine.ledger.deletions()["retrained_at"].isna().all()  # a chain still waits: not yet retrained
    assert engine.audit() == {}
    engine.retrain()  # the rest (policy all)
    assert engine.missing_stages() == [] and engine.ledger.deletions()["retrained_at"].notna().all()

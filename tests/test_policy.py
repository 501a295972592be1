"""Retraining policies: which stale chains a run retrains (pure), and the engine following them (exact, resumable)."""
from __future__ import annotations

import pytest

from s3t_ops.engine import S3T
from s3t_ops.policy import select_chains, served_depths
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


def test_under_a_budget_a_shard_that_serves_nothing_goes_before_one_that_serves_full_depth():
    # shard 0 serves nothing (its cheapest chain restarts at stage 1); shard 1 still serves full depth through
    # another sequence, its stale chain is cheaper. Cost alone would spend the budget on shard 1's resilience.
    costs = {(0, 0): 80, (0, 1): 90, (1, 2): 30}
    served = served_depths({(0, 0): 1, (0, 1): 1, (0, 2): 1, (1, 2): 2}, shards=2, sequences=3, depth=3)
    assert served == {0: 0, 1: 3}
    assert select_chains(costs, "all", budget=100) == [(1, 2)]  # cost first: 30 fits, then 80 does not
    assert select_chains(costs, "all", budget=100, served=served) == [(0, 0)]  # the dead shard first
    assert select_chains(costs, "cheapest", served=served) == [(0, 0), (1, 2)]  # no budget: every shard's cheapest
    assert select_chains(costs, "all", served=served) == [(0, 0), (1, 2), (0, 1)]  # rank still comes first


def test_served_depths_is_the_longest_intact_prefix_per_shard():
    assert served_depths({}, shards=2, sequences=2, depth=3) == {0: 3, 1: 3}
    assert served_depths({(0, 0): 3, (0, 1): 2, (1, 0): 1}, shards=2, sequences=2, depth=3) == {0: 2, 1: 3}


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


def test_a_budgeted_run_brings_back_the_shard_that_serves_nothing_first(tmp_path, tiny_backbone_dir, one_torch_thread):
    cfg, data = tiny_world(tmp_path, tiny_backbone_dir, 60)
    engine = S3T.create(cfg, data, progress=False, publisher=Publisher())
    engine.fit()
    train = engine.examples("train")
    cell = lambda s, j: train[(train["shard"] == s) & (train["slice"] == j)]["id"].iloc[0]  # noqa: E731
    engine.forget([cell(0, 0), cell(0, 1), cell(1, 1)])  # shard 0: both sequences stale from stage 1; shard 1 keeps depth 1
    assert {c.shard: c.depth for c in engine.served_plan().choices}.get(0, 0) == 0
    costs = engine.chain_costs(engine.stale_chains())
    dead = min(costs[(0, 0)], costs[(0, 1)])
    assert min(c for (s, _q), c in costs.items() if s == 1) < dead  # by cost alone shard 1 would go first
    report = engine.retrain(policy="all", budget=dead)
    assert {s.shard for s in report.trained} == {0} and report.grad_example_steps == dead
    assert {c.shard: c.depth for c in engine.served_plan().choices}[0] == cfg.slices
    assert engine.audit() == {}

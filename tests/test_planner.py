import json

import pytest

from s3t_ops.planner import (
    ServingPlan,
    ShardChoice,
    plan_for_deletions,
    serving_plan,
    valid_prefix,
)
from s3t_ops.sequences import cyclic
from tests.oracles import affected_slices, stages_to_retrain  # the tests' own model of staleness, checked here too


def test_valid_prefix():
    assert valid_prefix((2, 0, 1), set()) == 3
    assert valid_prefix((2, 0, 1), {1}) == 2
    assert valid_prefix((2, 0, 1), {0, 1}) == 1
    assert valid_prefix((2, 0, 1), {2}) == 0


def test_affected_slices_groups_by_shard():
    assignment = {"a": (0, 1), "b": (0, 1), "c": (0, 2), "d": (3, 0)}
    assert affected_slices(["a", "b", "c", "d"], assignment) == {
        0: frozenset({1, 2}),
        3: frozenset({0}),
    }
    assert affected_slices([], assignment) == {}


def test_affected_slices_unknown_ids():
    assignment = {"a": (0, 0)}
    with pytest.raises(KeyError) as exc:
        affected_slices(["a", "zz", "yy"], assignment)
    msg = str(exc.value)
    assert "yy, zz" in msg
    assert "..." not in msg

    many = [f"x{i:02d}" for i in range(12)]
    with pytest.raises(KeyError) as exc:
        affected_slices(many, assignment)
    msg = str(exc.value)
    assert "x09, ..." in msg
    assert "x10" not in msg


def test_serving_plan_prefers_depth_then_score_then_index():
    depths = {
        (0, 0): 2, (0, 1): 3, (0, 2): 3,  # depth decides: seq 1 beats the
        (1, 0): 2, (1, 1): 2,             # score tie-breaks
        (2, 0): 1, (2, 1): 1, (2, 2): 1,  # all equal -> lowest index
    }
    scores = {
        (0, 0, 2): 0.99, (0, 1, 3): 0.1, (0, 2, 3): 0.2,
        (1, 0, 2): 0.5, (1, 1, 2): 0.6,
        (2, 1, 1): 0.3, (2, 2, 1): 0.3,  # seq 0 missing -> -inf
    }
    plan = serving_plan(3, depths, scores)
    assert plan.choices == (
        ShardChoice(0, 2, 3, 0.2),
        ShardChoice(1, 1, 2, 0.6),
        ShardChoice(2, 1, 1, 0.3),
    )
    no_scores = serving_plan(3, depths)
    assert [(c.shard, c.seq, c.score) for c in no_scores.choices] == [
        (0, 1, None), (1, 0, None), (2, 0, None)
    ]


def test_serving_plan_dead_shards():
    plan = serving_plan(4, {(0, 0): 0, (0, 1): 0, (1, 0): 1, (3, 0): 0})
    assert plan.live_shards == (1,)
    assert plan.dead_shards == (0, 2, 3)
    with pytest.raises(ValueError):
        serving_plan(2, {(2, 0): 1})


def test_plan_round_trip():
    plan = serving_plan(3, {(0, 0): 2, (2, 1): 1}, {(0, 0, 2): 0.75})
    d = json.loads(json.dumps(plan.to_dict()))
    assert ServingPlan.from_dict(d) == plan
    assert ServingPlan.from_dict(d).dead_shards == (1,)


def test_plan_for_deletions():
    perms = cyclic(3, 3)  # (0,1,2), (2,0,1), (1,2,0)
    plan = plan_for_deletions(perms, 3, {0: {2}, 1: {0, 1, 2}})
    assert plan.choices == (ShardChoice(0, 0, 2, None), ShardChoice(2, 0, 3, None))
    assert plan.dead_shards == (1,)
    # Shard 2 only has seq 1 trained to depth 3; seq 0 stopped at stage 1.
    trained = {(2, 0): 1, (2, 2): 2}
    plan = plan_for_deletions(perms, 3, {0: {2}}, trained=trained)
    assert plan.choices[-1] == ShardChoice(2, 1, 3, None)


def test_stages_to_retrain_hand_example():
    perms = cyclic(3, 3)  # (0,1,2), (2,0,1), (1,2,0)
    assert stages_to_retrain(perms, 2, {1: {2}}) == [
        (1, 0, 3),
        (1, 1, 1), (1, 1, 2), (1, 1, 3),
        (1, 2, 2), (1, 2, 3),
    ]
    assert stages_to_retrain(perms, 2, {}) == []

import json

import pytest

from s3t_ops.planner import (
    ServingPlan,
    ShardChoice,
    affected_slices,
    deletion_rate_closed_form,
    expected_best_prefix_single_deletion,
    harmonic,
    plan_for_deletions,
    serving_plan,
    simulate_deletion_rate,
    sisa_kill_rate_closed_form,
    stages_to_retrain,
    valid_prefix,
)
from s3t_ops.sequences import bms, cyclic, permutation_tree


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


def test_harmonic_and_closed_forms():
    assert harmonic(0) == 0.0
    assert harmonic(4) == pytest.approx(25 / 12)
    assert deletion_rate_closed_form(5, 6, 1) == pytest.approx(30 * 137 / 60)
    assert sisa_kill_rate_closed_form(5) == pytest.approx(5 * 137 / 60)


@pytest.mark.parametrize("B", range(1, 7))
def test_simulated_rate_matches_closed_form(B):
    m, L = 5, 6
    sim = simulate_deletion_rate(cyclic(L, B), m, L, trials=20000, seed=B)
    expected = deletion_rate_closed_form(m, L, B)
    assert sim == pytest.approx(expected, rel=0.02)


def test_simulated_rate_increases_with_b():
    rates = [simulate_deletion_rate(cyclic(6, B), 5, 6, trials=5000) for B in (1, 3, 6)]
    assert rates[0] < rates[1] < rates[2]


def test_simulated_rate_tree_beyond_l_uses_distinct_first_slices():
    # Beyond B = L every first slice is already covered, so the rate saturates.
    sim = simulate_deletion_rate(permutation_tree(4, 10), 3, 4, trials=20000)
    assert sim == pytest.approx(deletion_rate_closed_form(3, 4, 4), rel=0.02)


def test_simulated_kill_mode():
    m = 5
    sim = simulate_deletion_rate(cyclic(6, 1), m, 6, trials=20000, mode="kill")
    assert sim == pytest.approx(sisa_kill_rate_closed_form(m), rel=0.02)


def test_simulation_reproducible_and_validates():
    a = simulate_deletion_rate(cyclic(4, 2), 3, 4, trials=500, seed=7)
    assert a == simulate_deletion_rate(cyclic(4, 2), 3, 4, trials=500, seed=7)
    with pytest.raises(ValueError, match="mode"):
        simulate_deletion_rate(cyclic(4, 2), 3, 4, mode="bogus")
    with pytest.raises(ValueError, match="permutation"):
        simulate_deletion_rate([(0, 1, 1)], 3, 3)


@pytest.mark.parametrize("L", [3, 5, 6])
def test_single_deletion_prefix(L):
    assert expected_best_prefix_single_deletion(cyclic(L, L), L) == pytest.approx(L - 1)
    assert expected_best_prefix_single_deletion(cyclic(L, 1), L) == pytest.approx((L - 1) / 2)
    assert expected_best_prefix_single_deletion(bms([1 / L] * L, L), L) == pytest.approx(L - 1)

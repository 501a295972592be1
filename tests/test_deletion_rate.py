import pytest

from s3t_ops.deletion_rate import (
    deletion_rate_closed_form,
    expected_best_prefix_single_deletion,
    harmonic,
    simulate_deletion_rate,
    sisa_kill_rate_closed_form,
)
from s3t_ops.sequences import bms, cyclic, permutation_tree


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

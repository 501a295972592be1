import math
from itertools import permutations

import pytest

from s3t_ops.sequences import (
    bms,
    cyclic,
    permutation_tree,
    positions,
    prefix_score,
    select_sequences,
)


def is_perm(seq, L):
    return sorted(seq) == list(range(L))


def assert_latin_square(rows, L):
    assert len(rows) == L
    for row in rows:
        assert is_perm(row, L)
    for pos in range(L):
        assert sorted(r[pos] for r in rows) == list(range(L))


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8])
def test_cyclic_full_is_latin_square(L):
    assert_latin_square(cyclic(L, L), L)


def test_cyclic_l3_exact_and_prefix_rows():
    assert cyclic(3, 3) == [(0, 1, 2), (2, 0, 1), (1, 2, 0)]
    for B in range(1, 7):
        assert cyclic(6, B) == cyclic(6, 6)[:B]


@pytest.mark.parametrize("B", [0, -1, 5])
def test_cyclic_bad_b(B):
    with pytest.raises(ValueError, match="B"):
        cyclic(4, B)


def test_tree_distinct_permutations_and_matches_cyclic():
    L = 4
    for B in range(1, 25):
        seqs = permutation_tree(L, B)
        assert len(seqs) == B
        assert len(set(seqs)) == B
        assert all(is_perm(s, L) for s in seqs)
        if B <= L:
            assert seqs == cyclic(L, B)
    assert set(permutation_tree(L, 24)) == set(permutations(range(L)))
    # Extensions of a shorter request are stable prefixes.
    assert permutation_tree(L, 24)[:10] == permutation_tree(L, 10)


def test_tree_bad_b():
    with pytest.raises(ValueError, match="L!"):
        permutation_tree(4, 25)
    with pytest.raises(ValueError):
        permutation_tree(4, 0)


def test_prefix_score_hand_computed():
    prior = [0.1, 0.2, 0.3]
    # t=1: 1*(1-0.1) + 2*(1-0.3) = 0.9 + 1.4
    assert prefix_score((0, 1), prior, t=1) == pytest.approx(2.3)
    # t=2, order (2, 0): 1*0.7^2 + 2*0.6^2
    assert prefix_score((2, 0), prior, t=2) == pytest.approx(0.49 + 0.72)
    assert prefix_score((), prior) == 0.0


@pytest.mark.parametrize("L", [3, 4, 6])
def test_bms_full_is_latin_square(L):
    prior = [0.9] + [0.1 / (L - 1)] * (L - 1)
    assert_latin_square(bms(prior, L), L)


@pytest.mark.parametrize("L", [4, 6])
def test_bms_pushes_risky_slice_late(L):
    prior = [0.9] + [0.1 / (L - 1)] * (L - 1)
    top = bms(prior, 2)
    assert len(top) == 2
    assert top[0][-1] == 0
    for seq in top:
        assert seq.index(0) >= L // 2
    # Ordered by score descending.
    assert prefix_score(top[0], prior) >= prefix_score(top[1], prior)


def test_bms_uniform_gives_distinct_permutations():
    L = 6
    seqs = bms([1 / L] * L, L)
    assert len(set(seqs)) == L
    assert all(is_perm(s, L) for s in seqs)


@pytest.mark.parametrize("prior", [[0.5, -0.1], [0.5, math.nan], [math.inf, 0.1]])
def test_bms_rejects_bad_prior(prior):
    with pytest.raises(ValueError, match="prior"):
        bms(prior, 1)


def test_bms_bad_b():
    with pytest.raises(ValueError, match="B"):
        bms([0.25] * 4, 5)


def test_select_sequences_dispatch():
    assert select_sequences("cyclic", 5, 3) == cyclic(5, 3)
    assert select_sequences("tree", 4, 7) == permutation_tree(4, 7)
    assert select_sequences("bms", 4, 4) == bms([0.25] * 4, 4)
    prior = [0.7, 0.1, 0.1, 0.1]
    assert select_sequences("bms", 4, 2, prior) == bms(prior, 2)
    with pytest.raises(ValueError, match="tree"):
        select_sequences("cyclic", 4, 5)
    with pytest.raises(ValueError, match="length"):
        select_sequences("bms", 4, 2, [0.5, 0.5])
    with pytest.raises(ValueError, match="cyclic, tree, bms"):
        select_sequences("random", 4, 2)


def test_positions():
    assert positions([(2, 0, 1)]) == [{2: 1, 0: 2, 1: 3}]

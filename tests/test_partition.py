"""Example -> (shard, slice): a pure, balanced function of the id; slice versions name member sets."""
from __future__ import annotations

import random
from collections import Counter

from s3t_ops.partition import assign, assign_all
from s3t_ops.tombstones import Keyring

KEYS = Keyring(bytes(range(32)))
slice_version = KEYS.slice_version


def _ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


def test_assignment_is_deterministic_and_in_range():
    ids = _ids(500)
    a = assign_all(ids, 5, 6)
    b = assign_all(list(reversed(ids)), 5, 6)
    assert a == b
    assert all(0 <= s < 5 and 0 <= j < 6 for s, j in a.values())
    assert all(assign(i, 5, 6) == a[i] for i in ids[:50])


def test_assignment_depends_on_seed_and_shape():
    ids = _ids(300)
    base = assign_all(ids, 3, 3, seed=0)
    assert assign_all(ids, 3, 3, seed=1) != base
    assert assign_all(ids, 4, 3, seed=0) != base


def test_assignment_is_roughly_balanced():
    m, L, n = 4, 5, 20_000
    counts = Counter(assign_all(_ids(n, seed=3), m, L).values())
    assert set(counts) == {(s, j) for s in range(m) for j in range(L)}
    expected = n / (m * L)  # 1000; a binomial sd is about 31
    assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), counts
    per_shard: Counter = Counter()
    for (s, _), c in counts.items():
        per_shard[s] += c
    assert all(abs(c - n / m) < 0.05 * n / m for c in per_shard.values())


def test_assignment_unchanged_for_others_when_some_are_removed():
    ids = _ids(400)
    before = assign_all(ids, 3, 4)
    rng = random.Random(7)
    removed = set(rng.sample(ids, 150))
    after = assign_all([i for i in ids if i not in removed], 3, 4)
    assert after == {i: c for i, c in before.items() if i not in removed}


def test_slice_version_is_order_independent():
    ids = _ids(30)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert slice_version(ids) == slice_version(shuffled) == slice_version(iter(shuffled))
    assert len(slice_version(ids)) == 16


def test_slice_version_changes_iff_members_change():
    ids = _ids(30)
    v = slice_version(ids)
    assert slice_version(ids[1:]) != v  # one member removed
    assert slice_version(ids + ["extra"]) != v
    assert slice_version(ids[:-1] + ["other"]) != v  # same size, different member
    assert slice_version(list(ids)) == v
    assert slice_version([]) != v and slice_version([]) == slice_version([])
    # ids are separated, so concatenations cannot collide
    assert slice_version(["ab", "c"]) != slice_version(["a", "bc"])


def test_slice_version_is_keyed_so_a_text_cannot_confirm_a_deletion():
    """Without the state's key, "current members + a candidate id" cannot be hashed into an older version: neither a
    plain hash of the members nor another state's key reproduces it."""
    import hashlib

    ids = _ids(30)
    before = slice_version(ids)
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\n")
    assert before != h.hexdigest()[:16]  # the plain hash the ledger used to keep
    other = Keyring(bytes(range(1, 33)))
    assert other.slice_version(ids) != before
    assert Keyring(bytes(range(32))).slice_version(ids) == before  # same key, same members: same version

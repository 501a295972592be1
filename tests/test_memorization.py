"""Memorization proxies, RUM bins, NegGrad+, ToW and MIA on hand-made inputs (no backbone: pure functions)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from s3t_ops.config import ConfigError
from s3t_ops.memorization.config import MemorizationConfig, MethodConfig, full_rum_schedule, neggrad_plus_schedule
from s3t_ops.memorization.methods import l1_strength, neggrad_plus_loss, random_labels, top_fraction_mask
from s3t_ops.memorization.metrics import accuracy, svc_mia, tow, tow_mia, true_label_confidence
from s3t_ops.memorization.proxies import ProxyTracker, memorization_score, step_proxies, symmetric_kl
from s3t_ops.memorization.rum import bin_sizes, shuffle_bins, split_bins
from s3t_ops.memorization.scores import inventory_memorization, memorization_from_runs, rank_correlation, subsample_masks

LN = math.log


# --- proxies --------------------------------------------------------------------------------
def test_step_proxies_follow_their_formulas():
    # row 0: p = (0.25, 0.75), label 0 -> wrong; row 1: p = (0.2, 0.3, 0.5) padded as 3 classes
    logits = torch.tensor([[LN(1.0), LN(3.0), -math.inf], [LN(2.0), LN(3.0), LN(5.0)]])
    labels = torch.tensor([0, 2])
    v = step_proxies(logits, labels)
    assert v["confidence"].tolist() == pytest.approx([0.25, 0.5])
    assert v["max_confidence"].tolist() == pytest.approx([0.75, 0.5])
    ent0 = 0.25 * LN(0.25) + 0.75 * LN(0.75)  # the zero-probability class contributes 0 log 0 = 0
    ent1 = 0.2 * LN(0.2) + 0.3 * LN(0.3) + 0.5 * LN(0.5)
    assert v["neg_entropy"].tolist() == pytest.approx([ent0, ent1], rel=1e-5)
    assert v["binary_accuracy"].tolist() == [0.0, 1.0]


def test_neg_entropy_of_a_certain_prediction_is_zero_not_nan():
    v = step_proxies(torch.tensor([[0.0, -math.inf]]), torch.tensor([0]))
    assert v["neg_entropy"].item() == 0.0 and v["confidence"].item() == 1.0


def test_tracker_keeps_running_means_over_epochs_per_id():
    t = ProxyTracker()
    # epoch 1: a is wrong with p=(0.25, 0.75); b right
    t(["a", "b"], torch.tensor([[0.0, LN(3.0)], [LN(9.0), 0.0]]), torch.tensor([0, 0]))
    # epoch 2: a is right with p=(0.75, 0.25)
    t(["a"], torch.tensor([[LN(3.0), 0.0]]), torch.tensor([0]))
    m = t.means()
    assert list(m.index) == ["a", "b"]
    assert m.loc["a", "confidence"] == pytest.approx((0.25 + 0.75) / 2)
    assert m.loc["a", "max_confidence"] == pytest.approx(0.75)
    assert m.loc["a", "binary_accuracy"] == pytest.approx(0.5)
    assert m.loc["b", "confidence"] == pytest.approx(0.9)
    assert m.loc["a", "n_obs"] == 2 and m.loc["b", "n_obs"] == 1
    with pytest.raises(ValueError):
        t(["a", "b"], torch.zeros(1, 2), torch.tensor([0]))


def test_symmetric_kl_by_hand():
    p, q = torch.tensor([[LN(0.5), LN(0.5)]]), torch.tensor([[LN(0.25), LN(0.75)]])
    kl_pq = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    kl_qp = 0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5)
    assert symmetric_kl(p, q).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-5)
    assert symmetric_kl(q, p).item() == pytest.approx(symmetric_kl(p, q).item())
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_orientation_high_means_memorized():
    s = pd.Series([0.9, 0.1], index=["easy", "hard"])
    for name in ("confidence", "max_confidence", "neg_entropy", "binary_accuracy"):
        assert memorization_score(s, name)["hard"] > memorization_score(s, name)["easy"]
    kl = pd.Series([0.01, 2.0], index=["easy", "hard"])
    assert memorization_score(kl, "holdout_retraining")["hard"] > memorization_score(kl, "holdout_retraining")["easy"]
    with pytest.raises(ValueError):
        memorization_score(s, "loss")


# --- RUM bins -------------------------------------------------------------------------------
def test_bins_split_by_rank_into_low_mid_high():
    scores = pd.Series([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0], index=[f"x{i}" for i in range(10)])
    bins = split_bins(scores)
    assert bin_sizes(10) == {"low": 3, "mid": 4, "high": 3}
    assert bins["low"] == ["x9", "x1", "x5"]  # scores 0, 1, 2
    assert bins["mid"] == ["x3", "x7", "x0", "x8"]  # 3..6: the four closest to the median 4.5
    assert bins["high"] == ["x4", "x6", "x2"]  # 7, 8, 9
    assert max(scores[bins["low"]]) <= min(scores[bins["mid"]]) and max(scores[bins["mid"]]) <= min(scores[bins["high"]])
    # a forget subset is split by its own ranks
    sub = split_bins(scores, ["x0", "x1", "x2"])
    assert sub == {"low": ["x1"], "mid": ["x0"], "high": ["x2"]}


def test_bins_are_deterministic_on_ties_and_reject_missing_or_nan():
    tied = pd.Series([1.0] * 6, index=list("fedcba"))
    assert split_bins(tied) == {"low": ["a", "b"], "mid": ["c", "d"], "high": ["e", "f"]}
    with pytest.raises(KeyError):
        split_bins(tied, ["a", "zz"])
    with pytest.raises(ValueError, match="NaN"):
        split_bins(pd.Series([1.0, np.nan, 2.0], index=list("abc")))


def test_shuffle_control_keeps_sizes_and_members():
    scores = pd.Series(np.arange(30, dtype=float), index=[f"x{i:02d}" for i in range(30)])
    bins = split_bins(scores)
    shuf = shuffle_bins(bins, seed=3)
    assert {k: len(v) for k, v in shuf.items()} == {k: len(v) for k, v in bins.items()}
    assert sorted(sum(shuf.values(), [])) == sorted(sum(bins.values(), []))
    assert shuf != bins
    assert shuffle_bins(bins, seed=3) == shuf


# --- methods --------------------------------------------------------------------------------
def test_neggrad_plus_loss_by_hand():
    r_logits, r_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    f_logits, f_y = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    ce_r = -LN(math.exp(2) / (math.exp(2) + 1))
    ce_f = LN(2.0)
    for a in (0.99, 0.97, 0.5):
        got = neggrad_plus_loss(r_logits, r_y, f_logits, f_y, a).item()
        assert got == pytest.approx(a * ce_r - (1 - a) * ce_f, rel=1e-6)
    # gradient descent on it pushes the forget example's true-label logit down and the retain one's up
    f = f_logits.clone().requires_grad_(True)
    r = r_logits.clone().requires_grad_(True)
    neggrad_plus_loss(r, r_y, f, f_y, 0.97).backward()
    assert f.grad[0, 1] > 0 and r.grad[0, 0] < 0


def test_l1_schedule_random_labels_and_saliency_fraction():
    assert [l1_strength(1e-3, e, 4) for e in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    y = random_labels(1000, 3, seed=1)
    assert set(y.tolist()) == {0, 1, 2} and torch.equal(y, random_labels(1000, 3, seed=1))
    mask = top_fraction_mask({"a": torch.tensor([[0.1, 5.0], [3.0, 0.2]]), "b": torch.tensor([4.0, 0.0, 1.0, 2.0])}, 0.5)
    assert mask["a"].tolist() == [[0.0, 1.0], [1.0, 0.0]] and mask["b"].tolist() == [1.0, 0.0, 0.0, 1.0]


# --- metrics --------------------------------------------------------------------------------
def test_tow_and_tow_mia_by_hand():
    u = {"forget": 0.9, "retain": 0.95, "test": 0.8, "mia": 0.3}
    r = {"forget": 0.7, "retain": 0.9, "test": 0.85, "mia": 0.6}
    assert tow(u, r) == pytest.approx(0.8 * 0.95 * 0.95)
    assert tow_mia(u, r) == pytest.approx(0.7 * 0.95 * 0.95)
    assert tow(r, r) == 1.0 and tow_mia(r, r) == 1.0
    assert tow({"forget": 1.0, "retain": 1.0, "test": 1.0}, {"forget": 0.0, "retain": 1.0, "test": 1.0}) == 0.0


def test_svc_mia_counts_forget_examples_predicted_non_member():
    rng = np.random.default_rng(0)
    retain = rng.uniform(0.9, 1.0, 200)  # members: confident
    test = rng.uniform(0.2, 0.4, 50)  # non-members: unsure
    assert svc_mia(retain, test, np.array([0.99, 0.97, 0.3, 0.25])) == pytest.approx(0.5)
    assert svc_mia(retain, test, np.array([0.98, 0.95, 0.99])) == 0.0
    assert svc_mia(retain, test, np.array([0.22, 0.35])) == 1.0
    assert math.isnan(svc_mia(retain, test, np.array([])))


def test_accuracy_and_true_label_confidence():
    logits = torch.tensor([[LN(1.0), LN(3.0)], [LN(4.0), LN(1.0)]])
    labels = torch.tensor([1, 1])
    assert accuracy(logits, labels) == 0.5
    assert true_label_confidence(logits, labels).tolist() == pytest.approx([0.75, 0.2])


# --- true memorization ----------------------------------------------------------------------
def test_memorization_from_runs_by_hand():
    in_mask = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    correct = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    mem = memorization_from_runs(in_mask, correct)
    assert mem[0] == pytest.approx(1.0 - 0.5)  # in: models 0,1 both right; out: models 2,3 -> 1/2
    assert mem[1] == pytest.approx(1.0 - 0.0)  # in: 0,2 right; out: 1,3 wrong
    assert np.isnan(mem[2])  # never in a training subset


def test_subsample_masks_draw_exactly_seventy_percent():
    m = subsample_masks(20, 8, 0.7, seed=4)
    assert m.shape == (8, 20) and (m.sum(1) == 14).all()
    assert (m == subsample_masks(20, 8, 0.7, seed=4)).all() and not (m == subsample_masks(20, 8, 0.7, seed=5)).all()


def test_inventory_estimate_compares_within_depth():
    # 4 models: depth 1 (seen, unseen), depth 2 (seen, unseen); one example
    seen = np.array([[1], [0], [1], [0]], dtype=bool)
    correct = np.array([[1], [0], [1], [1]], dtype=bool)
    depth = [1, 1, 2, 2]
    assert inventory_memorization(correct, seen, depth)[0] == pytest.approx(((1 - 0) + (1 - 1)) / 2)
    assert inventory_memorization(correct, seen)[0] == pytest.approx(1.0 - 0.5)  # pooled
    # a depth with only seen models is skipped, not counted as zero
    assert inventory_memorization(correct[[0, 1, 2]], seen[[0, 1, 2]], [1, 1, 2])[0] == pytest.approx(1.0)


def test_rank_correlation_is_spearman_on_shared_ids():
    a = pd.Series([1.0, 2.0, 3.0, np.nan], index=list("abcd"))
    b = pd.Series([10.0, 30.0, 20.0, 5.0, 0.0], index=list("abcde"))
    assert rank_correlation(a, b) == pytest.approx(0.5)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


# --- config ---------------------------------------------------------------------------------
def test_config_schedules_match_the_reference_and_validate():
    rf = neggrad_plus_schedule()
    assert [(rf[b].alpha, rf[b].lr, rf[b].epochs) for b in ("low", "mid", "high")] == [(0.99, 0.01, 5), (0.97, 0.01, 5), (0.97, 0.001, 10)]
    assert [full_rum_schedule()[b].method for b in ("low", "mid", "high")] == ["none", "finetune", "salun"]
    cfg = MemorizationConfig()
    assert MemorizationConfig.from_dict(cfg.to_dict()) == cfg
    for bad, field in ((dict(depth=0), "depth"), (dict(proxy="loss"), "proxy"), (dict(subsample_fraction=1.0), "subsample_fraction"),
                       (dict(rum_f={"low": MethodConfig("none")}), "rum_f")):
        with pytest.raises(ConfigError) as e:
            MemorizationConfig(**bad)
        assert e.value.field == field
    with pytest.raises(ConfigError, match="method"):
        MethodConfig("gradient_ascent")
    with pytest.raises(ConfigError, match="alpha"):
        MethodConfig("neggrad_plus", alpha=1.5)
    assert MethodConfig("neggrad_plus").alpha == 0.99 and MethodConfig("l1_sparse").alpha == 1e-4
    assert MethodConfig.from_dict(MethodConfig("l1_sparse").to_dict()) == MethodConfig("l1_sparse")
    with pytest.raises(ConfigError, match="depth"):
        MemorizationConfig(depth=3).check_groups(2)

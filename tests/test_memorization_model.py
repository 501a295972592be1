"""The monolithic LoRA model, proxies logged during training, unlearning methods, RUM and the oracle on a tiny BERT."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from s3t_ops.memorization.config import MemorizationConfig, MethodConfig
from s3t_ops.memorization.methods import oracle, saliency_mask, unlearn
from s3t_ops.classifier import MonolithicClassifier
from s3t_ops.memorization.proxies import ProxyTracker, holdout_retraining, memorization_score
from s3t_ops.memorization.rum import run_rum, split_bins, uniform_schedule
from s3t_ops.memorization.scores import subsampled_memorization
from s3t_ops.memorization.workflow import (
    memorization_scores,
    run_unlearning,
    select_forget_set,
    splits_from_frame,
    train_original,
)
from tests.conftest import toy_frame

MCFG = MemorizationConfig(depth=1, epochs=2, lr=5e-3, batch_size=8, holdout_max_epochs=3, holdout_patience=1,
                          subsample_models=3, proxy="confidence")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone_dir):
    from s3t_ops.backbone import Backbone
    from s3t_ops.config import S3TConfig
    from s3t_ops.data import build_dataset

    cfg = S3TConfig(shards=2, slices=2, budget=2, epochs=2, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
                    n_train=None, n_val=12, n_test=12, backbone=str(tiny_backbone_dir), state_dir=tmp_path_factory.mktemp("mem"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores: one thread is several times faster
    try:
        ds = build_dataset(toy_frame(60), None, 12, 12, seed=0)
        backbone = Backbone(cfg)
        splits = splits_from_frame(backbone, ds.frame, ds.label_names)
        clf = MonolithicClassifier(backbone, len(ds.label_names), depth=1)
        original = train_original(clf, splits, MCFG)
        yield clf, splits, original
    finally:
        torch.set_num_threads(threads)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_logs_every_proxy_for_every_example_and_is_deterministic(world):
    clf, splits, original = world
    p = original.proxies
    assert sorted(p.index) == sorted(splits.train.ids)
    assert (p["n_obs"] == MCFG.epochs).all()  # one observation per epoch: a running mean over epochs
    assert p[["confidence", "max_confidence", "binary_accuracy"]].stack().between(0, 1).all()
    assert (p["neg_entropy"] <= 0).all() and (p["max_confidence"] >= p["confidence"] - 1e-6).all()
    again = train_original(clf, splits, MCFG)
    assert _same(original.state, again.state) and np.allclose(original.proxies.to_numpy(), again.proxies.to_numpy())
    # only the top group's LoRA and the head are in the model
    assert all(k.startswith(("g1.", "head.")) for k in original.state) and any(k.startswith("g1.") for k in original.state)


def test_oracle_excludes_the_forget_set(world):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 9, seed=1)
    tracker = ProxyTracker()
    ref = oracle(clf, splits.train, forget, MCFG.epochs, MCFG.lr, MCFG.batch_size, seed=MCFG.seed, on_logits=tracker)
    expected = set(splits.train.ids) - set(forget)
    assert ref.seen_ids == expected and set(tracker.ids) == expected
    assert ref.grad_example_steps == len(expected) * MCFG.epochs
    assert not _same(ref.state, original.state)
    with pytest.raises(KeyError):
        oracle(clf, splits.train, ["not-a-training-id"], 1, 1e-3, 8)


@pytest.mark.parametrize("method", ["finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun"])
def test_each_method_moves_the_model_from_its_start(world, method):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 6, seed=2)
    retain = [i for i in splits.train.ids if i not in set(forget)]
    mcfg = MethodConfig(method, epochs=1, lr=0.05, alpha=0.9 if method != "l1_sparse" else 1e-3, batch_size=8)
    res = unlearn(clf, original.state, splits.train, forget, retain, mcfg, seed=0)
    assert res.state.keys() == original.state.keys() and not _same(res.state, original.state)
    assert res.grad_example_steps > 0
    again = unlearn(clf, original.state, splits.train, forget, retain, mcfg, seed=0)
    assert _same(res.state, again.state)


def test_neggrad_raises_the_forget_loss_and_none_changes_nothing(world):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 6, seed=3)
    rows = splits.train.rows(forget)
    y = splits.train.labels.index_select(0, rows)

    def forget_loss(state):
        return float(torch.nn.functional.cross_entropy(clf.logits(state, splits.train, rows), y))

    res = unlearn(clf, original.state, splits.train, forget, [], MethodConfig("neggrad", epochs=2, lr=0.05, batch_size=8))
    assert forget_loss(res.state) > forget_loss(original.state)
    assert unlearn(clf, original.state, splits.train, forget, [], MethodConfig("none")).state is original.state
    with pytest.raises(ValueError, match="both"):
        unlearn(clf, original.state, splits.train, forget, forget[:1], MethodConfig("finetune"))


def test_salun_updates_only_salient_weights(world):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 6, seed=4)
    mask = saliency_mask(clf, original.state, splits.train, forget, fraction=0.3)
    total = sum(m.numel() for m in mask.values())
    assert sum(float(m.sum()) for m in mask.values()) == pytest.approx(round(0.3 * total))
    retain = [i for i in splits.train.ids if i not in set(forget)]
    res = unlearn(clf, original.state, splits.train, forget, retain,
                  MethodConfig("salun", epochs=1, lr=0.05, saliency=0.3, optimizer="sgd", momentum=0.0, batch_size=8))
    names = dict(clf.named_trainable())
    assert names.keys() == mask.keys()
    moved = 0
    for name, m in mask.items():
        key = name if name.startswith("head.") else _state_key(name)
        delta = (res.state[key] - original.state[key]).abs()
        assert float(delta[m == 0].sum()) == 0.0  # masked-out weights never move
        moved += int((delta[m == 1] > 0).sum())
    assert moved > 0


def _state_key(peft_name: str) -> str:
    # "g1.base_model.model.encoder.layer.3.attention.self.query.lora_A.g1.weight" -> the group state key
    group, rest = peft_name.split(".", 1)
    rest = rest.replace(f".{group}.", ".")
    return f"{group}.{rest}"


def test_rum_is_sequential_low_mid_high_with_unprocessed_examples_retained(world, monkeypatch):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 9, seed=5)
    scores = memorization_score(original.proxies["confidence"], "confidence")
    calls = []
    import s3t_ops.memorization.rum as rum_mod

    real = rum_mod.unlearn

    def spy(clf_, state, data, f, r, mcfg, seed=0):
        calls.append((list(f), set(r), state))
        return real(clf_, state, data, f, r, mcfg, seed=seed)

    monkeypatch.setattr(rum_mod, "unlearn", spy)
    res = run_rum(clf, original.state, splits.train, forget, scores, uniform_schedule(MethodConfig("neggrad_plus", epochs=1, lr=0.01, alpha=0.97, batch_size=8)))
    bins = split_bins(scores, forget)
    assert [c[0] for c in calls] == [bins["low"], bins["mid"], bins["high"]]
    all_f = set(forget)
    assert calls[0][1] == set(splits.train.ids) - set(bins["low"])  # mid and high still retained
    assert calls[1][1] == set(splits.train.ids) - set(bins["low"]) - set(bins["mid"])
    assert calls[2][1] == set(splits.train.ids) - all_f
    assert calls[0][2] is original.state and calls[1][2] is res.steps[0].result.state and calls[2][2] is res.steps[1].result.state
    assert res.state is res.steps[2].result.state and [s["bin"] for s in res.summary()] == ["low", "mid", "high"]


def test_rum_rescore_reranks_the_remaining_forget_examples(world):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 9, seed=6)
    scores = pd.Series(np.arange(9, dtype=float), index=forget)
    seen = []

    def rescore(state, remaining):
        seen.append(sorted(remaining))
        return pd.Series(-np.arange(len(remaining), dtype=float), index=remaining)  # reverse the order

    res = run_rum(clf, original.state, splits.train, forget, scores, uniform_schedule(MethodConfig("none")), rescore=rescore)
    assert res.bins["low"] == forget[:3]
    assert seen == [sorted(forget[3:]), sorted(forget[3:6])]  # after low, then after mid; never after the last step
    assert res.bins["mid"] == [forget[8], forget[7], forget[6]]  # the re-ranking reversed the remaining order
    assert res.bins["high"] == forget[3:6]


def test_holdout_retraining_proxy_is_a_nonnegative_kl_per_training_example(world):
    clf, splits, original = world
    kl = holdout_retraining(clf, original.state, splits.val, splits.train, lr=5e-3, max_epochs=3, patience=1, batch_size=8)
    assert list(kl.index) == splits.train.ids and (kl >= 0).all() and kl.max() > 0
    same = holdout_retraining(clf, original.state, splits.val, splits.train, lr=5e-3, max_epochs=3, patience=1, batch_size=8)
    assert np.allclose(kl.to_numpy(), same.to_numpy())


def test_subsampled_true_memorization_and_scores_table(world):
    clf, splits, original = world
    true = subsampled_memorization(clf, splits.train, n_models=3, fraction=0.7, epochs=1, lr=5e-3, batch_size=8)
    assert list(true.index) == splits.train.ids and ((true["n_in"] + true["n_out"]) == 3).all()
    defined = true["memorization"].dropna()
    assert defined.between(-1, 1).all() and len(defined) == int(((true["n_in"] > 0) & (true["n_out"] > 0)).sum())
    table = memorization_scores(clf, splits, original, MCFG, holdout=True)
    assert {"confidence", "max_confidence", "neg_entropy", "binary_accuracy", "holdout_retraining"} <= set(table.columns)


def test_run_unlearning_scores_every_variant_against_the_oracle(world):
    clf, splits, original = world
    forget = select_forget_set(splits.train.ids, 6, seed=7)
    fast = MethodConfig("neggrad_plus", epochs=1, lr=0.01, alpha=0.97, batch_size=8)
    mcfg = MCFG.replace(rum_f=uniform_schedule(fast), rum={"low": MethodConfig("none"), "mid": MethodConfig("finetune", epochs=1, batch_size=8),
                                                            "high": MethodConfig("salun", epochs=1, batch_size=8)})
    report = run_unlearning(clf, splits, original.state, forget, original.proxies, mcfg)
    d = report.to_dict()
    v = d["variants"]
    assert d["approximate"] is True and json.loads(json.dumps(d)) == d  # JSON-safe
    assert set(report.states) == set(v) and _same(report.states["original"], original.state)
    assert set(v) == {"original", "oracle", "vanilla", "rum_f", "rum_f_shuffle", "rum", "rum_shuffle"}
    for name, row in v.items():
        assert all(0 <= row[k] <= 1 for k in ("forget", "retain", "test", "mia"))
        if name != "oracle":
            assert 0 <= row["tow"] <= 1 and 0 <= row["tow_mia"] <= 1
    assert v["rum"]["steps"][0]["method"] == "none" and v["rum"]["steps"][0]["grad_example_steps"] == 0


def test_inventory_estimate_uses_checkpoints_that_did_and_did_not_see_each_example(tmp_path, tiny_config):
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher
    from s3t_ops.memorization.scores import inventory_scores

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tmp_path / "toy.csv"
        toy_frame(60).to_csv(data, index=False)
        engine = S3T.create(tiny_config(epochs=1), data, progress=False, publisher=Publisher())
        engine.build_trunk()
        engine.train()
        inv = inventory_scores(engine)
        # cyclic B=2, L=2: per shard the prefixes (0), (1), (0,1), (1,0) -> 8 checkpoints in all.
        # An example of slice j in shard s was seen by (j), (0,1), (1,0) of its shard and by no other.
        assert sorted(inv.index) == sorted(engine.ledger.examples("train")["id"])
        assert (inv["n_in"] == 3).all() and (inv["n_out"] == 5).all()
        assert inv["memorization"].between(-1, 1).all()

        # the one-call door for `s3t unlearn`: the original model is cached in the state folder
        from s3t_ops.memorization.service import unlearn_state

        tiny = MCFG.replace(epochs=1)
        first = unlearn_state(engine.cfg.state_dir, n_forget=6, mcfg=tiny, variants=("oracle", "vanilla"), holdout=False)
        cached = list((engine.cfg.state_dir / "memorization").glob("original-*/model.safetensors"))
        assert len(cached) == 1
        stamp = cached[0].stat().st_mtime_ns
        again = unlearn_state(engine.cfg.state_dir, n_forget=6, mcfg=tiny, variants=("oracle", "vanilla"), holdout=False)
        def timeless(report):
            return {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in report.variants.items()}

        assert timeless(again) == timeless(first) and set(first.variants) == {"oracle", "vanilla"}
        assert again.forget_ids == first.forget_ids and len(first.forget_ids) == 6
        assert cached[0].stat().st_mtime_ns == stamp  # loaded, not retrained
        with pytest.raises(KeyError):
            unlearn_state(engine.cfg.state_dir, forget_ids=["nope"], mcfg=tiny, variants=("oracle",), holdout=False, inventory=False)

        victim = inv.index[0]
        engine.forget([victim])  # its checkpoints are purged; the rest of the inventory still answers
        after = inventory_scores(engine)
        assert victim not in after.index and len(after) == len(inv) - 1
        # examples sharing the victim's slice lost every model that saw them until retraining
        assert after["memorization"].isna().sum() == (after["n_in"] == 0).sum() > 0

        # RUM refined by the free inventory estimate; unscored forget examples rank at the median
        fast = uniform_schedule(MethodConfig("neggrad_plus", epochs=1, lr=0.01, alpha=0.97, batch_size=8))
        unscored = after.index[after["memorization"].isna()][:2].tolist()
        scored = after.index[after["memorization"].notna()][:4].tolist()
        rep = unlearn_state(engine.cfg.state_dir, forget_ids=unscored + scored, mcfg=tiny.replace(proxy="inventory", rum_f=fast),
                            variants=("oracle", "rum_f"), holdout=False)
        assert rep.proxy == "inventory" and rep.unscored == len(unscored) and sum(rep.variants["rum_f"]["bins"].values()) == 6
    finally:
        torch.set_num_threads(threads)

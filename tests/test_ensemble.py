"""Shared-trunk ensemble inference equals running every shard model on its own through the HF forward."""
from __future__ import annotations

import pytest
import torch

from s3t_ops.backbone import Backbone, mean_pool
from s3t_ops.checkpoints import join_state, split_state
from s3t_ops.config import S3TConfig
from s3t_ops.ensemble import Ensemble, NoLiveShardError, ShardModel
from s3t_ops.trunk import compute_trunk

TEXTS = ["I love this", "what an awful day it was today, really bad", "ok", "the store opens at nine and closes at ten",
         "great great great", "meh"]
NUM_LABELS = 3
DEPTHS = {0: 3, 1: 1, 2: 4, 3: 2}  # shard -> served depth: every start block of the 4 groups is used


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def cfg(tiny_backbone_dir) -> S3TConfig:
    # 4 blocks, L=4: one block per group, so depths 1..4 start from blocks 3, 2, 1, 0; a float32 trunk, so the cached
    # path can be compared bit for bit with the full forward pass (float16, the default, is tested on its own below)
    return S3TConfig(shards=4, slices=4, budget=1, max_tokens=16, lora_rank=4, lora_alpha=8, backbone=str(tiny_backbone_dir),
                     trunk_dtype="float32")


def _random_state(bb: Backbone, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A 'trained' stage checkpoint: nonzero LoRA A and B for group k, and a random head."""
    lora = {n: torch.randn(t.shape, generator=gen) * 0.5 for n, t in bb.group_state(k).items()}
    head = {"weight": torch.randn(NUM_LABELS, bb.hidden_size, generator=gen), "bias": torch.randn(NUM_LABELS, generator=gen)}
    return join_state(lora, head)


@pytest.fixture(scope="module")
def shard_models(cfg) -> list[ShardModel]:
    bb = Backbone(cfg)
    gen = torch.Generator().manual_seed(123)
    return [ShardModel(s, d, [_random_state(bb, k, gen) for k in range(1, d + 1)]) for s, d in DEPTHS.items()]


def _reference_logits(cfg: S3TConfig, sm: ShardModel, texts: list[str]) -> torch.Tensor:
    """Independent path: a fresh backbone holding only this shard's groups, the full HF forward from tokens."""
    bb = Backbone(cfg)  # groups above sm.depth stay at their init (B = 0): the frozen backbone
    for g, state in enumerate(sm.states, start=1):
        bb.load_group(g, split_state(state)[0])
    bb.peft.base_model.set_adapter([f"g{k}" for k in range(1, cfg.slices + 1)])  # all on: untrained ones are identity
    ids, mask = bb.tokenize(texts)
    with torch.no_grad():
        h = bb.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = mean_pool(h, mask)
        with bb.peft.disable_adapter():
            plain = bb.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    head = split_state(sm.states[-1])[1]
    # the adapters must matter, or this comparison would prove nothing
    assert not torch.allclose(h, plain, atol=1e-3)
    return pooled @ head["weight"].T + head["bias"]


@pytest.fixture(scope="module")
def reference(cfg, shard_models) -> dict[int, torch.Tensor]:
    return {sm.shard: _reference_logits(cfg, sm, TEXTS) for sm in shard_models}


@pytest.fixture(scope="module")
def backbone(cfg) -> Backbone:
    return Backbone(cfg)


def test_trunk_states_match_the_hf_hidden_states(backbone):
    ids, mask = backbone.tokenize(TEXTS)
    ours = backbone.trunk_states(ids, mask, backbone.layout.start_blocks())
    assert sorted(ours) == [0, 1, 2, 3]
    with torch.no_grad(), backbone.peft.disable_adapter():
        hs = backbone.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for b, h in ours.items():
        assert torch.allclose(h, hs[b], atol=1e-5)


def test_shared_trunk_logits_equal_each_shard_run_alone(backbone, shard_models, reference):
    ens = Ensemble(backbone, shard_models, NUM_LABELS)
    shared = ens.shard_logits(TEXTS)
    assert sorted(shared) == sorted(DEPTHS)
    for s, ref in reference.items():
        assert shared[s].shape == (len(TEXTS), NUM_LABELS)
        assert torch.allclose(shared[s], ref, atol=1e-5), (s, (shared[s] - ref).abs().max())
    # the shard models really differ, so averaging is not trivially right
    assert not torch.allclose(reference[0], reference[1], atol=1e-2)
    mean = torch.stack([reference[s] for s in sorted(reference)]).mean(0)
    assert torch.allclose(ens.logits(TEXTS), mean, atol=1e-5)
    labels, probs = ens.predict(TEXTS)
    assert torch.equal(labels, mean.argmax(-1)) and torch.allclose(probs.sum(-1), torch.ones(len(TEXTS)))


def test_one_model_ensembles_and_any_order_agree(backbone, shard_models, reference):
    for sm in shard_models:
        alone = Ensemble(backbone, [sm], NUM_LABELS).logits(TEXTS)
        assert torch.allclose(alone, reference[sm.shard], atol=1e-5)
    # evaluating the shards in another order leaves no adapter of one shard in another's result
    reversed_ens = Ensemble(backbone, list(reversed(shard_models)), NUM_LABELS).shard_logits(TEXTS, batch_size=4)
    for s, ref in reference.items():
        assert torch.allclose(reversed_ens[s], ref, atol=1e-5)


def test_cached_trunk_and_separate_path_agree(backbone, shard_models, reference):
    ens = Ensemble(backbone, shard_models, NUM_LABELS)
    cache = compute_trunk(backbone, [f"id{i}" for i in range(len(TEXTS))], TEXTS, batch_size=4)
    from_cache = ens.shard_logits_from_trunk(cache, batch_size=5)
    separate = ens.shard_logits_separate(TEXTS)
    for s, ref in reference.items():
        assert torch.allclose(from_cache[s], ref, atol=1e-5)
        assert torch.allclose(separate[s], ref, atol=1e-5)
    rows = torch.tensor([4, 1])
    assert torch.allclose(ens.logits_from_trunk(cache, rows), ens.logits(TEXTS)[rows], atol=1e-5)


def test_empty_plan_and_bad_depth_are_errors(backbone, shard_models):
    with pytest.raises(NoLiveShardError):
        Ensemble(backbone, [], NUM_LABELS)
    bad = ShardModel(0, 2, shard_models[0].states[:1])
    with pytest.raises(ValueError, match="depth 2"):
        Ensemble(backbone, [bad], NUM_LABELS).logits(TEXTS)


def test_the_trunk_keeps_block_0_as_token_ids_and_recomputes_it_bit_for_bit(backbone):
    ids = [f"id{i}" for i in range(len(TEXTS))]
    cache = compute_trunk(backbone, ids, TEXTS, batch_size=4)
    assert 0 not in cache.hidden and cache.input_ids is not None and cache.input_ids.dtype == torch.int32
    input_ids, mask = backbone.tokenize(TEXTS)
    full = backbone.trunk_states(input_ids, mask, backbone.layout.start_blocks())
    rows = torch.arange(len(TEXTS))
    h0, m = cache.batch(rows, 0, backbone.embed)
    assert torch.equal(h0, full[0]) and torch.equal(m, mask)
    for b in cache.hidden:
        assert torch.equal(cache.batch(rows, b)[0], full[b])
    with pytest.raises(ValueError, match="embedding"):
        cache.batch(rows, 0)
    # per example: ids (int32) + uint8 mask + 3 of the 4 boundaries, instead of 4 float32 boundaries + int64 mask
    T, H = 16, backbone.hidden_size
    assert cache.nbytes() / len(TEXTS) == T * 4 + T + 3 * T * H * 4 < (4 * T * H * 4 + T * 8)


def test_a_float16_trunk_halves_the_stored_states_and_serves_nearly_the_same_logits(cfg, shard_models):
    from s3t_ops.trunk import bytes_per_example

    ids = [f"id{i}" for i in range(len(TEXTS))]
    full = compute_trunk(Backbone(cfg), ids, TEXTS, batch_size=4)
    half_bb = Backbone(cfg.replace(trunk_dtype="float16"))
    half = compute_trunk(half_bb, ids, TEXTS, batch_size=4)
    assert all(h.dtype == torch.float16 for h in half.hidden.values())
    assert bytes_per_example(half) < 0.55 * bytes_per_example(full)
    a = Ensemble(half_bb, shard_models, NUM_LABELS).shard_logits_from_trunk(full)
    b = Ensemble(half_bb, shard_models, NUM_LABELS).shard_logits_from_trunk(half)
    for s in a:
        if DEPTHS[s] == 4:  # starts at block 0: recomputed from token ids in both caches, bit for bit
            assert torch.equal(a[s], b[s])
        else:  # starts from a stored float16 state
            assert torch.allclose(a[s], b[s], atol=5e-2) and not torch.equal(a[s], b[s])

"""S3TConfig: every invalid value fails at construction with a ConfigError that names the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3t_ops.config import ConfigError, S3TConfig


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(shards=0), "shards"),
        (dict(shards=-2), "shards"),
        (dict(shards=True), "shards"),  # a bool is not a count
        (dict(shards=2.0), "shards"),
        (dict(slices=0), "slices"),
        (dict(budget=0), "budget"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(n_train=0), "n_train"),
        (dict(n_val=-1), "n_val"),
        (dict(n_test=1.5), "n_test"),
        (dict(selection="random"), "selection"),
        (dict(slices=3, budget=4, selection="cyclic"), "budget"),  # cyclic: B <= L
        (dict(slices=3, budget=4, selection="bms", deletion_prior=(0.1, 0.1, 0.1)), "budget"),
        (dict(slices=3, budget=7, selection="tree"), "budget"),  # more than 3! sequences
        (dict(slices=3, budget=2, deletion_prior=(0.5, 0.5)), "deletion_prior"),  # wrong length
        (dict(slices=2, budget=2, deletion_prior=(0.5, 1.5)), "deletion_prior"),  # not a probability
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lora_targets=()), "lora_targets"),
    ],
)
def test_invalid_value_names_the_field(changes, field):
    with pytest.raises(ConfigError) as exc:
        S3TConfig(**changes)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}:")
    assert isinstance(exc.value, ValueError)


def test_valid_edge_values_are_accepted():
    S3TConfig(slices=3, budget=6, selection="tree")  # B = L! with the permutation tree
    S3TConfig(slices=3, budget=3, selection="bms", deletion_prior=(0.0, 0.5, 1.0))
    S3TConfig(n_train=None, n_val=None, n_test=None, lora_dropout=0.0)


def test_budget_message_points_to_tree():
    with pytest.raises(ConfigError, match="tree"):
        S3TConfig(slices=2, budget=3)


def test_check_backbone_needs_one_block_per_group():
    cfg = S3TConfig(slices=5, budget=1)
    cfg.check_backbone(5)
    cfg.check_backbone(12)
    with pytest.raises(ConfigError) as exc:
        cfg.check_backbone(4)
    assert exc.value.field == "slices" and "4" in str(exc.value)


def test_check_examples_needs_one_example_per_slice():
    cfg = S3TConfig(shards=4, slices=3)
    cfg.check_examples(12)
    with pytest.raises(ConfigError) as exc:
        cfg.check_examples(11)
    assert exc.value.field == "shards" and "12" in str(exc.value) and "11" in str(exc.value)


def test_to_dict_from_dict_round_trip_through_json(tmp_path):
    cfg = S3TConfig(shards=4, slices=3, budget=3, selection="bms", deletion_prior=[0.2, 0.3, 0.5],
                    lora_targets=["query", "key", "value"], lr=2e-4, n_train=None, state_dir=tmp_path / "s")
    d = cfg.to_dict()
    assert "state_dir" not in d and d["lora_targets"] == ["query", "key", "value"]  # where it lives is not saved with it
    assert d["deletion_prior"] == [0.2, 0.3, 0.5]
    back = S3TConfig.from_dict({**json.loads(json.dumps(d)), "state_dir": str(tmp_path / "s")})
    assert back == cfg
    assert isinstance(back.state_dir, Path) and isinstance(back.lora_targets, tuple) and isinstance(back.deletion_prior, tuple)
    assert back.training_fingerprint() == cfg.training_fingerprint()
    plain = S3TConfig()
    assert S3TConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_from_dict_rejects_unknown_fields_and_validates():
    d = S3TConfig().to_dict()
    with pytest.raises(ConfigError) as exc:
        S3TConfig.from_dict({**d, "shardz": 3})
    assert exc.value.field == "shardz"
    with pytest.raises(ConfigError) as exc:
        S3TConfig.from_dict({**d, "lr": 0})
    assert exc.value.field == "lr"


def test_fingerprint_tracks_training_fields_only(tmp_path):
    base = S3TConfig()
    assert base.replace(state_dir=tmp_path).training_fingerprint() == base.training_fingerprint()
    assert base.replace(shards=5).training_fingerprint() == base.training_fingerprint()  # keys carry the shard
    for change in (dict(lr=2e-3), dict(epochs=3), dict(seed=1), dict(lora_rank=4), dict(max_tokens=64), dict(batch_size=8)):
        assert base.replace(**change).training_fingerprint() != base.training_fingerprint(), change


def test_replace_revalidates():
    with pytest.raises(ConfigError) as exc:
        S3TConfig().replace(batch_size=0)
    assert exc.value.field == "batch_size"


def test_a_state_saved_before_a_field_existed_keeps_its_old_behaviour(tmp_path):
    """refine_groups became the default after states were saved without it: they were trained without it."""
    d = S3TConfig(state_dir=tmp_path).to_dict()
    del d["refine_groups"]
    assert S3TConfig.from_dict(d).refine_groups is False
    assert S3TConfig().refine_groups is True
    assert S3TConfig.from_dict(S3TConfig(state_dir=tmp_path).to_dict()).refine_groups is True


def test_a_new_state_from_a_partial_config_takes_todays_defaults_at_every_door(tmp_path):
    """The fields a user writes for a new state (S3T_CONFIG, or none) leave the rest at today's defaults, through the
    CLI's config and the pipeline's settings alike; a saved config.json missing a field keeps that field's old
    behaviour (float32 trunk, no refine_groups), and one that names float32 keeps it."""
    import json

    from pipelines.settings import load_settings

    small = {"shards": 2, "slices": 2, "budget": 2, "epochs": 1}
    assert S3TConfig.from_dict(small, saved=False) == S3TConfig(**small)
    new = tmp_path / "new"
    (tmp_path / "small.json").write_text(json.dumps(small))
    for env in ({"S3T_STATE": str(new)}, {"S3T_STATE": str(new), "S3T_CONFIG": str(tmp_path / "small.json")}):
        cfg = load_settings(env).cfg
        assert (cfg.trunk_dtype, cfg.refine_groups) == ("float16", True) == (S3TConfig().trunk_dtype, S3TConfig().refine_groups)
    old = tmp_path / "old"
    old.mkdir()
    saved = S3TConfig(state_dir=old).to_dict()
    del saved["trunk_dtype"], saved["refine_groups"]
    (old / "config.json").write_text(json.dumps(saved))
    cfg = load_settings({"S3T_STATE": str(old)}).cfg
    assert (cfg.trunk_dtype, cfg.refine_groups) == ("float32", False)
    (old / "config.json").write_text(json.dumps({**saved, "trunk_dtype": "float32"}))
    assert load_settings({"S3T_STATE": str(old)}).cfg.trunk_dtype == "float32"

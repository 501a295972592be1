"""One validated configuration for an S3T model, so every module reads the same values."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3t_ops.sequences import SELECTIONS

TRUNK_DTYPES = ("float32", "float16", "bfloat16")
# what a stage trains (docs/algorithm.md, "Stage models"): "layered" = S3T's top-down stages (stage k adapts the top k
# groups, the groups below stay the frozen backbone); "full_depth" = every stage adapts every group, warm-started from
# the stage before it (SISA's slice checkpoints along S3T's sequences; with B = 1 it is classic SISA)
STAGE_MODELS = ("layered", "full_depth")
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when a GPU is found when the state is created (then fixed)
# fields added after the first release, with the behaviour states saved without them were trained with
LEGACY_FIELDS: dict[str, Any] = {"frozen_blocks": 0, "warm_start_head": True, "refine_groups": False, "trunk_dtype": "float32",
                                 "storage_url": None, "stage_model": "layered", "device": "cpu"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def option(default: Any, help: str, flag: bool = True, **more: Any) -> Any:
    """A config field with its help text: declared once here, it makes the CLI's flag (cli.py), the Dagster
    settings (a JSON file of these fields, pipelines/settings.py) and its documentation."""
    return field(default=default, metadata={"help": help, "flag": flag, **more})


@dataclass(frozen=True)
class S3TConfig:
    """Everything that decides what is trained. Fields that change checkpoints enter `training_fingerprint`. The
    state folder (`state_dir`) is where it lives, not what it is: kept apart, it is never saved with the rest."""

    shards: int = option(3, "m, number of shards")
    slices: int = option(3, "L, slices per shard = LoRA groups")
    budget: int = option(3, "B, sequences per shard")
    selection: str = option("cyclic", "sequence selection", choices=SELECTIONS)
    deletion_prior: tuple[float, ...] | None = option(None, "per-slice deletion probabilities for --selection bms")
    lora_rank: int = option(8, "LoRA rank r (the flag also sets alpha = 2r)")
    lora_alpha: int = option(16, "LoRA alpha", flag=False)
    lora_dropout: float = option(0.1, "LoRA dropout", flag=False)
    # every linear layer of a BERT block ("output.dense" also matches "attention.output.dense"); the
    # stage ablation (BENCHMARKS.md) measured +3 points over query/value only
    lora_targets: tuple[str, ...] = option(("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
                                           "module names that get a LoRA", flag=False)
    frozen_blocks: int = option(0, "lowest blocks never adapted: one cached trunk below every group", flag=False)
    warm_start_head: bool = option(True, "stage k's head starts from stage k-1's", flag=False)
    refine_groups: bool = option(True, "stage k also keeps training groups 1..k-1 on its prefix", flag=False)
    stage_model: str = option("layered", "what a stage trains: layered (S3T's top-down groups) or full_depth (every "
                                          "group, from the stage before: SISA's checkpoints along S3T's sequences)",
                              choices=STAGE_MODELS)
    # float16 since the stage ablation on 3 seeds (BENCHMARKS.md, "Trunk cache"): the same accuracy, half the bytes;
    # states saved before keep float32 (LEGACY_FIELDS), and their checkpoint keys
    trunk_dtype: str = option("float16", "how cached hidden states are stored (float16: half of float32's bytes, the "
                                         "same accuracy measured on 3 seeds)", choices=TRUNK_DTYPES)
    # the device decides the bits of a stage (a GPU's kernels are not the CPU's): in the fingerprint unless cpu, and
    # `auto` is resolved (and saved) when a state is created
    device: str = option("cpu", "where the trunk is computed and stages train: cpu, cuda (deterministic kernels), or auto "
                                "(cuda when a GPU is found)", choices=DEVICES)
    epochs: int = option(2, "epochs per stage")
    batch_size: int = option(32, "batch size")
    lr: float = option(1e-3, "learning rate of LoRA and head")
    max_tokens: int = option(32, "tokens per text")
    seed: int = option(0, "seed of the split, the partition and every stage")
    n_train: int | None = option(1800, "training examples to sample (0 = all)", zero_means_all=True)
    n_val: int | None = option(300, "validation examples (0 = all)", zero_means_all=True)
    n_test: int | None = option(600, "test examples (0 = all)", zero_means_all=True)
    backbone: str | None = option(None, "local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)")
    # where the trunk cache, slice files and checkpoints live (s3t_ops/storage.py): None = the state folder
    # itself, else an fsspec URL. Not in the fingerprint: where a checkpoint is stored does not change what it holds.
    storage_url: str | None = option(None, "where the trunk cache, slice files and checkpoints live: an fsspec URL "
                                           "(s3://bucket/prefix, gs://..., a folder); default: the state folder. The ledger stays there")
    state_dir: Path = field(default=Path("s3t_state"), metadata={"runtime": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.deletion_prior is not None:
            object.__setattr__(self, "deletion_prior", tuple(float(p) for p in self.deletion_prior))
        self.validate()

    def validate(self) -> None:
        for name in ("shards", "slices", "budget", "lora_rank", "lora_alpha", "epochs", "batch_size", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("n_train", "n_val", "n_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"must be a positive integer or None (all), got {value!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError("selection", f"must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.selection in ("cyclic", "bms") and self.budget > self.slices:
            raise ConfigError(
                "budget",
                f"{self.selection} selection allows at most slices={self.slices} sequences, got {self.budget}; "
                "use selection='tree' for a larger budget",
            )
        factorial = 1
        for i in range(2, self.slices + 1):
            factorial *= i
        if self.budget > factorial:
            raise ConfigError("budget", f"at most slices! = {factorial} distinct sequences exist, got {self.budget}")
        if self.deletion_prior is not None:
            if len(self.deletion_prior) != self.slices:
                raise ConfigError("deletion_prior", f"needs one probability per slice ({self.slices}), got {len(self.deletion_prior)}")
            if any(not (0.0 <= p <= 1.0) for p in self.deletion_prior):
                raise ConfigError("deletion_prior", "probabilities must lie in [0, 1]")
        if not isinstance(self.frozen_blocks, int) or isinstance(self.frozen_blocks, bool) or self.frozen_blocks < 0:
            raise ConfigError("frozen_blocks", f"must be a non-negative integer, got {self.frozen_blocks!r}")
        if self.device not in DEVICES:
            raise ConfigError("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.stage_model not in STAGE_MODELS:
            raise ConfigError("stage_model", f"must be one of {', '.join(STAGE_MODELS)}, got {self.stage_model!r}")
        if self.trunk_dtype not in TRUNK_DTYPES:
            raise ConfigError("trunk_dtype", f"must be one of {', '.join(TRUNK_DTYPES)}, got {self.trunk_dtype!r}")
        for name in ("warm_start_head", "refine_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if not self.lora_targets:
            raise ConfigError("lora_targets", "name at least one module (e.g. query, value)")
        if self.storage_url is not None:
            from s3t_ops.storage import check_url

            if not isinstance(self.storage_url, str) or not self.storage_url.strip():
                raise ConfigError("storage_url", f"must be a URL or folder (or None: the state folder), got {self.storage_url!r}")
            try:
                check_url(self.storage_url)
            except ValueError as exc:
                raise ConfigError("storage_url", str(exc)) from None

    def check_backbone(self, n_blocks: int, max_positions: int | None = None) -> None:
        """Fail early, naming the field, when the backbone cannot hold one group per slice or the tokens."""
        if max_positions is not None and self.max_tokens > max_positions:
            raise ConfigError("max_tokens", f"{self.max_tokens} exceeds the backbone's {max_positions} positions")
        if self.slices > n_blocks:
            raise ConfigError("slices", f"L={self.slices} groups need at least {self.slices} transformer blocks; the backbone has {n_blocks}")
        if self.slices > n_blocks - self.frozen_blocks:
            raise ConfigError("frozen_blocks", f"{self.frozen_blocks} frozen blocks leave {n_blocks - self.frozen_blocks} of the "
                                               f"backbone's {n_blocks} for L={self.slices} groups; freeze fewer")

    def resolved(self) -> "S3TConfig":
        """`device` auto made concrete (cuda when torch sees a GPU, else cpu); a state saves this. ConfigError when
        cuda is asked for and there is none."""
        if self.device == "cpu":
            return self
        import torch

        found = torch.cuda.is_available()
        if self.device == "cuda" and not found:
            raise ConfigError("device", "cuda was asked for, but torch finds no GPU here (use --device cpu or auto)")
        return self.replace(device="cuda" if found else "cpu")

    def active_groups(self, stage: int) -> int:
        """Groups (from the top) a model of depth `stage` runs with adapters on: the top `stage` ones for
        layered stages, every group for full-depth stages. Training and serving start from the trunk at
        the first block of the lowest of them."""
        return self.slices if self.stage_model == "full_depth" else stage

    def check_examples(self, n_train: int) -> None:
        """Every slice must be able to hold at least one example."""
        cells = self.shards * self.slices
        if n_train < cells:
            raise ConfigError("shards", f"m*L = {self.shards}*{self.slices} = {cells} slices need at least as many training examples; got {n_train}")

    def training_fingerprint(self) -> str:
        """Hash of the fields that change a trained stage; part of every checkpoint key."""
        keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "epochs", "batch_size", "lr", "max_tokens", "seed", "slices")
        values = {k: getattr(self, k) for k in keys}
        # fields added later enter only when they differ from the old behaviour, so existing keys stay valid
        if self.frozen_blocks:
            values["frozen_blocks"] = self.frozen_blocks
        if not self.warm_start_head:
            values["warm_start_head"] = False
        if self.refine_groups:
            values["refine_groups"] = True
        if self.trunk_dtype != "float32":
            values["trunk_dtype"] = self.trunk_dtype
        if self.device not in ("cpu", "auto"):
            values["device"] = self.device
        if self.stage_model != "layered":
            values["stage_model"] = self.stage_model
            values.pop("refine_groups", None)  # implied: a full-depth stage trains every group
        payload = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (config.json, registry params, the Dagster resource): everything but `state_dir`."""
        d = {f.name: getattr(self, f.name) for f in fields_to_save()}
        d["lora_targets"] = list(self.lora_targets)
        d["deletion_prior"] = list(self.deletion_prior) if self.deletion_prior is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], saved: bool = True) -> "S3TConfig":
        """`saved`: a config a state wrote (config.json, a registered model): a field it lacks was added later, and that
        state was trained with the field's old behaviour (LEGACY_FIELDS), not today's default. Not saved: the fields a
        user chose for a new state (S3T_CONFIG, a JSON file); every other field takes today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config field(s): {', '.join(unknown)}")
        return cls(**{**LEGACY_FIELDS, **data}) if saved else cls(**data)

    def replace(self, **changes: Any) -> "S3TConfig":
        return dataclasses.replace(self, **changes)


def fields_to_save(cls: type = S3TConfig) -> list[dataclasses.Field]:
    """The fields a config saves (all but runtime-only ones, such as S3TConfig's `state_dir`)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("runtime")]


def flag_fields(cls: type = S3TConfig) -> list[dataclasses.Field]:
    """The fields a door offers (a CLI flag `--name-with-dashes`, a Dagster config field), with their help and choices."""
    return [f for f in fields_to_save(cls) if f.metadata.get("flag")]


PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def plain_type(f: dataclasses.Field) -> type | None:
    """int, float, str or bool for a field annotated as one of them (None for other annotations)."""
    return PLAIN_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))

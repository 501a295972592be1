"""Configuration of memorization-aware approximate unlearning (docs/memorization.md, "## Methods" and "## RUM").

Two dataclasses: `MethodConfig` is one unlearning step (which method, how long, how hard);
`MemorizationConfig` is everything else (the monolithic model, proxies, true-score estimation, RUM).
Both validate at construction and raise `s3t_ops.config.ConfigError` naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from s3t_ops.config import ConfigError, option

METHODS = ("none", "finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun")
OPTIMIZERS = ("sgd", "adamw")
PROXIES = ("confidence", "max_confidence", "neg_entropy", "binary_accuracy", "holdout_retraining")
# what RUM can refine the forget set by: a proxy, the S3T-inventory estimate, or the subsampled true score
REFINERS = PROXIES + ("inventory", "memorization")
BINS = ("low", "mid", "high")
# `s3t unlearn --method/--proxy`: RUM, RUM^F, vanilla NegGrad+, or one method on all of F
UNLEARN_METHODS = ("rum", "rum_f", "vanilla", *(m for m in METHODS if m != "none"))
UNLEARN_PROXIES = (*PROXIES, "inventory")
ALPHA_DEFAULTS = {"neggrad_plus": 0.99, "l1_sparse": 1e-4}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}")


def _unit(name: str, value: Any, closed_low: bool = True, closed_high: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if closed_low else value > 0) and (value <= 1 if closed_high else value < 1)
    if not ok:
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ConfigError(name, f"must lie in {lo}0, 1{hi}, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """One unlearning step on a monolithic model.

    method: none | finetune | neggrad | neggrad_plus | l1_sparse | random_label | salun.
    alpha: NegGrad+ retain weight a in `a·CE(retain) - (1-a)·CE(forget)` (default 0.99); for
    l1_sparse the L1 strength gamma (default 1e-4, decayed linearly to 0 over the epochs, as in the
    l1-sparse reference code); unused by the other methods. None = the method's default.
    saliency: SalUn keeps this fraction of the trainable weights (largest |gradient of the forget loss|).
    Optimizer defaults follow the RUM reference code (SGD, momentum 0.9), whose learning rates these are.
    """

    method: str
    epochs: int = 5
    lr: float = 0.01
    alpha: float | None = None
    saliency: float = 0.5
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", ALPHA_DEFAULTS.get(self.method, 0.0))
        if self.method != "none":
            _positive_int("epochs", self.epochs)
            _positive_float("lr", self.lr)
        _positive_int("batch_size", self.batch_size)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.method == "l1_sparse":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
                raise ConfigError("alpha", f"the L1 strength must be >= 0, got {self.alpha!r}")
        else:
            _unit("alpha", self.alpha)
        _unit("saliency", self.saliency, closed_low=False)
        _unit("momentum", self.momentum, closed_high=False)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown method field(s): {', '.join(unknown)}")
        return cls(**data)


def neggrad_plus_schedule() -> dict[str, MethodConfig]:
    """The papers' RUM^F with NegGrad+ per bin (docs/memorization.md, "## RUM"; ResNet/SGD): a 0.99/0.97/0.97, lr 0.01/0.01/0.001, epochs 5/5/10."""
    return {
        "low": MethodConfig("neggrad_plus", epochs=5, lr=0.01, alpha=0.99),
        "mid": MethodConfig("neggrad_plus", epochs=5, lr=0.01, alpha=0.97),
        "high": MethodConfig("neggrad_plus", epochs=10, lr=0.001, alpha=0.97),
    }


def full_rum_schedule() -> dict[str, MethodConfig]:
    """Full RUM as chosen on CIFAR-10 (docs/memorization.md, "## RUM"): nothing -> fine-tune -> SalUn."""
    return {
        "low": MethodConfig("none"),
        "mid": MethodConfig("finetune", epochs=10, lr=0.01),
        "high": MethodConfig("salun", epochs=10, lr=0.01, saliency=0.5),
    }


# Tuned for the LoRA MiniLM model (frozen trunk, LoRA on the top group + head, AdamW; original model 6 epochs at
# 3e-3) on a validation forget set: other tweets, another forget set (benchmarks/memorization_tuning.py, two
# rounds; MEMORIZATION.md). The reference SGD settings above come from ResNets on CIFAR.
TUNED: dict[str, MethodConfig] = {
    "neggrad_plus": MethodConfig("neggrad_plus", epochs=3, lr=2e-3, alpha=0.8, optimizer="adamw"),
    "finetune": MethodConfig("finetune", epochs=5, lr=1e-2, optimizer="adamw"),
    "salun": MethodConfig("salun", epochs=2, lr=3e-3, saliency=0.5, optimizer="adamw"),
    "random_label": MethodConfig("random_label", epochs=2, lr=3e-3, optimizer="adamw"),
    "neggrad": MethodConfig("neggrad", epochs=1, lr=1e-3, optimizer="adamw"),
    "l1_sparse": MethodConfig("l1_sparse", epochs=3, lr=1e-2, alpha=1e-3, optimizer="adamw"),
}


def tuned_rum_f_schedule() -> dict[str, MethodConfig]:
    """RUM^F with the NegGrad+ setting tuned for RUM^F in every bin (a = 0.9: three steps forget more than one)."""
    step = MethodConfig("neggrad_plus", epochs=3, lr=2e-3, alpha=0.9, optimizer="adamw")
    return {b: step for b in BINS}


def tuned_rum_schedule() -> dict[str, MethodConfig]:
    """Full RUM (nothing -> fine-tune -> SalUn), the per-bin methods of the CIFAR-10 choice, tuned settings."""
    return {"low": MethodConfig("none"), "mid": MethodConfig("finetune", epochs=3, lr=1e-2, optimizer="adamw"),
            "high": MethodConfig("salun", epochs=2, lr=3e-3, saliency=0.5, optimizer="adamw")}


def default_method(method: str) -> MethodConfig:
    """Settings of one method applied alone (`s3t unlearn --method <method>`), for the LoRA MiniLM model."""
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    return TUNED.get(method, MethodConfig(method))


@dataclass(frozen=True)
class MemorizationConfig:
    """The monolithic model, its proxies, the true-score estimators and RUM.

    depth: how many top groups of the backbone (split as S3TConfig.slices groups) carry a trained
    LoRA; the rest is the frozen trunk, cached once (as the engine's stages do).
    epochs/lr/batch_size: training of the original model, the oracle and the subsampled models (AdamW,
    like the engine's stages). Proxies are running means over these epochs.
    holdout_*: the holdout-retraining proxy (fine-tune a copy on held-out data; stop after `patience`
    epochs without improvement of the held-out training loss, at most `holdout_max_epochs`).
    subsample_*: the true memorization score (models on random `subsample_fraction` subsets).
    proxy: what RUM ranks the forget set by (a proxy, `inventory` or `memorization`).
    rum_f / rum / vanilla: the RUM^F and full-RUM schedules and the vanilla NegGrad+ step; the defaults
    are tuned for this LoRA model (`TUNED`); `neggrad_plus_schedule()` / `full_rum_schedule()` are the
    papers' ResNet/SGD settings.
    """

    depth: int = option(1, "top groups with a trained LoRA")
    epochs: int = option(6, "epochs of the original model and the oracle")
    lr: float = option(3e-3, "their learning rate (AdamW)")
    batch_size: int = 32
    holdout_lr: float = 1e-3
    holdout_max_epochs: int = 20
    holdout_patience: int = 4
    subsample_models: int = option(16, "models trained on random subsets for the subsampled true memorization score")
    subsample_fraction: float = 0.7
    proxy: str = "confidence"
    rum_f: dict[str, MethodConfig] = field(default_factory=tuned_rum_f_schedule)
    rum: dict[str, MethodConfig] = field(default_factory=tuned_rum_schedule)
    vanilla: MethodConfig = field(default_factory=lambda: TUNED["neggrad_plus"])
    seed: int = option(0, "seed of the original model (the first seed, with several)")

    def __post_init__(self) -> None:
        for name in ("depth", "epochs", "batch_size", "holdout_max_epochs", "holdout_patience", "subsample_models"):
            _positive_int(name, getattr(self, name))
        for name in ("lr", "holdout_lr"):
            _positive_float(name, getattr(self, name))
        _unit("subsample_fraction", self.subsample_fraction, closed_low=False, closed_high=False)
        if self.proxy not in REFINERS:
            raise ConfigError("proxy", f"must be one of {', '.join(REFINERS)}, got {self.proxy!r}")
        for name in ("rum_f", "rum"):
            schedule = {k: v if isinstance(v, MethodConfig) else MethodConfig.from_dict(v) for k, v in dict(getattr(self, name)).items()}
            if set(schedule) != set(BINS):
                raise ConfigError(name, f"needs one method per bin {BINS}, got {sorted(schedule)}")
            object.__setattr__(self, name, schedule)
        if not isinstance(self.vanilla, MethodConfig):
            object.__setattr__(self, "vanilla", MethodConfig.from_dict(dict(self.vanilla)))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")

    def check_groups(self, groups: int) -> None:
        if self.depth > groups:
            raise ConfigError("depth", f"the backbone is split into {groups} group(s); depth {self.depth} is too deep")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rum_f"] = {k: v.to_dict() for k, v in self.rum_f.items()}
        d["rum"] = {k: v.to_dict() for k, v in self.rum.items()}
        d["vanilla"] = self.vanilla.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemorizationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown memorization config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "MemorizationConfig":
        return dataclasses.replace(self, **changes)

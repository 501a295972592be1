"""One ordinary LoRA model: every group's adapter trained at once, on the same frozen backbone and trunk.

This is the model of the non-S3T baselines (full retraining, per-shard LoRA, classic SISA). It uses
the same LoRA targets, rank and hyper-parameters as S3T's stages; the only difference is that all L
adapters train together from the start, so its input is the trunk at the bottom group's first block
(with n_blocks divisible by L that is the embedding output: nothing below is shared).

It is the memorization group's monolithic classifier at depth L (`FullLoRA`), trained by the same
loop (`memorization.model.train_classifier`): one model definition, one way to batch, order, seed and
save a LoRA model that is not S3T's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from s3t_ops.backbone import Backbone
from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State, TrainResult, train_classifier
from s3t_ops.trunk import TrunkCache


class FullLoRA(MonolithicClassifier):
    """The monolithic classifier with every group trained (depth L), seeded as the baselines always were.

    Two random draws differ from the memorization model, and are kept so the recorded baseline runs
    (benchmarks/measured) reproduce bit for bit: group k's LoRA A is seeded `seed + 7919·k`, and a run
    continued from a checkpoint (SISA's full model, slice after slice) first builds a new head under
    the run's seed, which moves the dropout masks that follow.
    """

    def __init__(self, backbone: Backbone, num_labels: int):
        super().__init__(backbone, num_labels, depth=backbone.layout.groups)

    def group_seed(self, seed: int, k: int) -> int:
        return seed + 7919 * k

    def begin(self, seed: int, init: State | None) -> None:
        if init is not None:
            self.head = nn.Linear(self.backbone.hidden_size, self.num_labels)
        super().begin(seed, init)


def full_logits(backbone: Backbone, state: dict[str, torch.Tensor], num_labels: int, trunk: TrunkCache,
                rows: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    return FullLoRA(backbone, num_labels).trunk_logits(state, trunk, rows, batch_size)


def train_full_lora(
    backbone: Backbone,
    trunk: TrunkCache,
    train_ids: Sequence[str],
    labels: torch.Tensor,
    seed: int,
    num_labels: int,
    init: dict[str, torch.Tensor] | None = None,
    epochs: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train all L adapters and a head together on `train_ids` (labels[j] belongs to train_ids[j]);
    from `init` (a previous state) or fresh.

    Deterministic like S3T's stages: seeded initialisation, per-id hashed data order each epoch.
    """
    cfg = backbone.cfg
    data = LabeledTrunk.partial(trunk, train_ids, labels)
    on_logits = None if on_batch is None else (lambda ids, logits, y: on_batch(len(ids)))
    return train_classifier(FullLoRA(backbone, num_labels), data, cfg.epochs if epochs is None else epochs, cfg.lr,
                            cfg.batch_size, seed, ids=train_ids, init=init, on_logits=on_logits)

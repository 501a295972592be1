"""S3T stage training *without* the shared trunk: every step runs the full network from the embeddings.

Same seed, initialisation, data order and dropout placement as `s3t_ops.stages.train_stage`, so the
two produce the same checkpoint (up to float rounding); only the cost differs. Used by the training
benchmark as the naive reference and by tests to prove the trunk shortcut is exact.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from s3t_ops.backbone import Backbone
from s3t_ops.stages import StageResult, fit_group


def train_stage_naive(
    backbone: Backbone,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    train_ids: Sequence[str],
    labels: torch.Tensor,
    k: int,
    parents: Sequence[dict[str, torch.Tensor]],
    seed: int,
    num_labels: int,
    on_batch: Callable[[int], None] | None = None,
) -> StageResult:
    """`input_ids`/`mask`/`labels` are row-aligned with `train_ids` (tokenized once, up front)."""
    t0 = time.perf_counter()

    def features(idx: torch.Tensor) -> torch.Tensor:  # full forward: embeddings and every block, every step
        h = backbone.encoder.embeddings(input_ids=input_ids[idx])
        return backbone.run_from(h, mask[idx], 0)

    result, _ = fit_group(backbone, train_ids, labels, k, parents, seed, num_labels, features, on_batch)
    result.seconds = time.perf_counter() - t0
    return result

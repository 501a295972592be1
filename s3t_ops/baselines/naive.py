"""S3T stage training *without* the shared trunk: every step runs the full network from the embeddings.

Same seed, initialisation, data order and dropout placement as `s3t_ops.stages.train_stage`, so the
two produce the same checkpoint (up to float rounding); only the cost differs. Used by the training
benchmark as the naive reference and by tests to prove the trunk shortcut is exact.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from s3t_ops.backbone import Backbone, new_head
from s3t_ops.checkpoints import join_state
from s3t_ops.stages import StageResult, epoch_order, load_prefix


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
    if len(parents) != k - 1:
        raise ValueError(f"stage {k} needs {k - 1} parent checkpoints, got {len(parents)}")
    cfg = backbone.cfg
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parent_head = load_prefix(backbone, parents)
        backbone.reset_group(k, seed)
        backbone.activate(k)
        head = new_head(backbone.hidden_size, num_labels, seed)
        if parent_head is not None:
            head.load_state_dict(parent_head)
        params = backbone.group_parameters(k)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=cfg.lr, weight_decay=0.0)
        loss_fn = nn.CrossEntropyLoss()
        result = StageResult(state={}, grad_example_steps=0, steps=0)
        try:
            for epoch in range(cfg.epochs):
                backbone.set_train_blocks(backbone.layout.blocks(k))
                head.train()
                order = torch.tensor(epoch_order(train_ids, seed, epoch), dtype=torch.long)
                total_loss, correct = 0.0, 0
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    m = mask[idx]
                    h = backbone.encoder.embeddings(input_ids=input_ids[idx])  # full forward: embeddings ...
                    logits = head(backbone.run_from(h, m, 0))  # ... and every block, every step
                    y = labels[idx]
                    loss = loss_fn(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    result.steps += 1
                    result.grad_example_steps += len(idx)
                    total_loss += float(loss.detach()) * len(idx)
                    correct += int((logits.argmax(-1) == y).sum())
                    if on_batch:
                        on_batch(len(idx))
                result.epoch_losses.append(total_loss / len(order))
                result.epoch_accuracies.append(correct / len(order))
        finally:
            backbone.peft.eval()
            head.eval()
            for p in params:
                p.requires_grad_(False)
        result.state = join_state(backbone.group_state(k), {n: t.detach().clone() for n, t in head.state_dict().items()})
    result.seconds = time.perf_counter() - t0
    return result

"""One ordinary LoRA model: every group's adapter trained at once, on the same frozen backbone and trunk.

This is the model of the non-S3T baselines (full retraining, per-shard LoRA, classic SISA). It uses
the same LoRA targets, rank and hyper-parameters as S3T's stages; the only difference is that all L
adapters train together from the start, so its input is the trunk at the bottom group's first block
(with n_blocks divisible by L that is the embedding output: nothing below is shared).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from s3t_ops.backbone import Backbone, new_head
from s3t_ops.stages import depth_logits, epoch_order
from s3t_ops.trunk import TrunkCache


@dataclass
class LoraResult:
    state: dict[str, torch.Tensor]  # "g{k}.<peft key>" for every group k + "head.<key>"
    grad_example_steps: int
    steps: int
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)


def _group_prefix(k: int) -> str:
    return f"g{k}."


def split_full_state(state: dict[str, torch.Tensor], groups: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    loras = []
    for k in range(1, groups + 1):
        p = _group_prefix(k)
        loras.append({key[len(p):]: v for key, v in state.items() if key.startswith(p)})
    head = {key[len("head."):]: v for key, v in state.items() if key.startswith("head.")}
    return loras, head


def load_full(backbone: Backbone, state: dict[str, torch.Tensor], num_labels: int) -> nn.Linear:
    """Load every group's adapter and the head; all groups active."""
    L = backbone.layout.groups
    loras, head_state = split_full_state(state, L)
    for k, lora in enumerate(loras, start=1):
        backbone.load_group(k, lora)
    backbone.activate(L)
    head = nn.Linear(backbone.hidden_size, num_labels)
    head.load_state_dict(head_state)
    head.eval()
    return head


def full_logits(backbone: Backbone, state: dict[str, torch.Tensor], num_labels: int, trunk: TrunkCache,
                rows: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    head = load_full(backbone, state, num_labels)
    rows = torch.arange(len(trunk)) if rows is None else rows
    return depth_logits(backbone, head, trunk, rows, backbone.layout.groups, batch_size)


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
) -> LoraResult:
    """Train all L adapters and a head together on `train_ids`; from `init` (a previous state) or fresh.

    Deterministic like S3T's stages: seeded initialisation, per-id hashed data order each epoch.
    """
    if len(train_ids) == 0:
        raise ValueError("no training examples")
    cfg = backbone.cfg
    L = backbone.layout.groups
    epochs = cfg.epochs if epochs is None else epochs
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init is None:
            for k in range(1, L + 1):
                backbone.reset_group(k, seed + 7919 * k)
            head = new_head(backbone.hidden_size, num_labels, seed)
        else:
            head = load_full(backbone, init, num_labels)
        backbone.activate(L)
        params = [p for k in range(1, L + 1) for p in backbone.group_parameters(k)]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=cfg.lr, weight_decay=0.0)
        start = backbone.layout.start_block(L)
        blocks = sorted(b for k in range(1, L + 1) for b in backbone.layout.blocks(k))
        rows = trunk.rows(train_ids)
        loss_fn = nn.CrossEntropyLoss()
        result = LoraResult(state={}, grad_example_steps=0, steps=0, seconds=0.0)
        try:
            for epoch in range(epochs):
                backbone.set_train_blocks(blocks)
                head.train()
                order = torch.tensor(epoch_order(train_ids, seed, epoch), dtype=torch.long)
                total = 0.0
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    h, mask = trunk.batch(rows[idx], start)
                    logits = head(backbone.run_from(h, mask, start))
                    loss = loss_fn(logits, labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    result.steps += 1
                    result.grad_example_steps += len(idx)
                    total += float(loss.detach()) * len(idx)
                    if on_batch:
                        on_batch(len(idx))
                result.epoch_losses.append(total / len(order))
        finally:
            backbone.peft.eval()
            head.eval()
            for p in params:
                p.requires_grad_(False)
        state: dict[str, torch.Tensor] = {}
        for k in range(1, L + 1):
            state.update({_group_prefix(k) + key: v for key, v in backbone.group_state(k).items()})
        state.update({"head." + key: v.detach().clone() for key, v in head.state_dict().items()})
        result.state = state
    result.seconds = time.perf_counter() - t0
    return result

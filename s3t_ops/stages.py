"""Train one S3T stage: group k (from the top) of one shard's sequence, on the prefix's cumulative data.

Deterministic by construction: the seed comes from (shard, prefix), the data order of each epoch
from a hash of (seed, epoch, id). Removing an example therefore leaves the order of all others
unchanged, and retraining reproduces a from-scratch run bit for bit (CPU).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from s3t_ops.backbone import Backbone, new_head
from s3t_ops.checkpoints import group_states, join_groups, join_state, split_state
from s3t_ops.trunk import TrunkCache


@dataclass
class StageResult:
    state: dict[str, torch.Tensor]  # "lora.*" of group k + "head.*"
    grad_example_steps: int  # examples that went through a gradient step (epochs counted)
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    epoch_accuracies: list[float] = field(default_factory=list)
    val_acc: float | None = None
    seconds: float = 0.0


def epoch_order(ids: Sequence[str], seed: int, epoch: int) -> list[int]:
    """Order from per-id hashes, independent of which other ids are present."""
    keys = [hashlib.sha256(f"{seed}|{epoch}|{i}".encode()).digest() for i in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def gradient_step(optimizer: torch.optim.Optimizer, loss_fn: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The one training step of every loop (a stage here, the ordinary classifier in classifier.py): the loss of these
    logits, gradients cleared, backward, one optimizer step. Returns the loss."""
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def group_seed(seed: int, group: int) -> int:
    """The seed of group `group`'s fresh LoRA in a full-depth stage 1 seeded `seed` (one stream per group)."""
    return int(hashlib.sha256(f"group|{seed}|{group}".encode()).hexdigest()[:8], 16) % (2**31)


def load_prefix(backbone: Backbone, parents: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Load groups 1..k-1 from their stage checkpoints, in order (a stage that refined the groups above it
    overrides them); returns the last head (or None)."""
    head = None
    for stage, state in enumerate(parents, start=1):
        for g, lora in sorted(group_states(state, stage).items()):
            backbone.load_group(g, lora)
        head = split_state(state)[1]
    return head


def depth_logits(backbone: Backbone, head: nn.Module, trunk: TrunkCache, rows: torch.Tensor, depth: int, batch_size: int) -> torch.Tensor:
    """Logits of a model running the top `depth` groups (adapters already loaded and active) on cached trunk rows."""
    start = backbone.layout.start_block(depth)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            h, mask = trunk.batch(rows[i:i + batch_size], start, backbone.embed)
            out.append(head(backbone.run_from(h, mask, start)).cpu())
    return torch.cat(out) if out else torch.zeros(0, head.out_features)


def train_stage(
    backbone: Backbone,
    trunk: TrunkCache,
    train_ids: Sequence[str],
    labels: torch.Tensor,
    k: int,
    parents: Sequence[dict[str, torch.Tensor]],
    seed: int,
    num_labels: int,
    val: tuple[TrunkCache, torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> StageResult:
    """Train stage k: layered, group k (groups 1..k-1 from `parents`, refined or frozen; groups below k untrained);
    full-depth, every group, continued from stage k-1's (fresh at stage 1)."""
    if len(train_ids) == 0:
        raise ValueError(f"stage {k} has no training examples")
    t0 = time.perf_counter()
    span = backbone.cfg.active_groups(k)
    start = backbone.layout.start_block(span)
    rows = trunk.rows(train_ids)

    def features(idx: torch.Tensor) -> torch.Tensor:  # the frozen part comes from the trunk cache
        h, mask = trunk.batch(rows[idx], start, backbone.embed)
        return backbone.run_from(h, mask, start)

    result, head = fit_group(backbone, train_ids, labels, k, parents, seed, num_labels, features, on_batch)
    if val is not None and len(val[0]) > 0:
        vtrunk, vlabels = val
        logits = depth_logits(backbone, head, vtrunk, torch.arange(len(vtrunk)), span, max(backbone.cfg.batch_size, 128))
        result.val_acc = float((logits.argmax(-1) == vlabels).float().mean())
    result.seconds = time.perf_counter() - t0
    return result


def fit_group(
    backbone: Backbone,
    train_ids: Sequence[str],
    labels: torch.Tensor,
    k: int,
    parents: Sequence[dict[str, torch.Tensor]],
    seed: int,
    num_labels: int,
    features: Callable[[torch.Tensor], torch.Tensor],
    on_batch: Callable[[int], None] | None = None,
) -> tuple[StageResult, nn.Linear]:
    """The stage's training loop; `features(rows)` gives the pooled encoder output of those rows.

    Shared by the trunk path above and the naive baseline (full forward every step), so the two differ
    only in how features are computed: same seed, initialisation, data order and dropout placement.
    """
    if len(parents) != k - 1:
        raise ValueError(f"stage {k} needs {k - 1} parent checkpoints, got {len(parents)}")
    cfg = backbone.cfg
    full = cfg.stage_model == "full_depth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parent_head = load_prefix(backbone, parents)
        if full:  # every group: fresh at stage 1, else continued from stage k-1 (loaded above)
            trained = list(range(1, cfg.slices + 1))
            if k == 1:
                for g in trained:
                    backbone.reset_group(g, group_seed(seed, g))
        else:  # refine: groups 1..k-1 keep learning on the prefix
            backbone.reset_group(k, seed)
            trained = list(range(1, k + 1)) if cfg.refine_groups else [k]
        backbone.activate(cfg.active_groups(k))
        head = new_head(backbone.hidden_size, num_labels, seed)
        if parent_head is not None and cfg.warm_start_head:
            head.load_state_dict(parent_head)
        head = head.to(backbone.device)
        labels = labels.to(backbone.device)
        params = [p for g in trained for p in backbone.group_parameters(g)]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=cfg.lr, weight_decay=0.0)
        loss_fn = nn.CrossEntropyLoss()
        result = StageResult(state={}, grad_example_steps=0, steps=0)
        try:
            for epoch in range(cfg.epochs):
                backbone.set_train_blocks([b for g in trained for b in backbone.layout.blocks(g)])
                head.train()
                order = torch.tensor(epoch_order(train_ids, seed, epoch), dtype=torch.long)
                total_loss, correct = 0.0, 0
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    logits = head(features(idx))
                    y = labels[idx]
                    loss = gradient_step(optimizer, loss_fn, logits, y)
                    result.steps += 1
                    result.grad_example_steps += len(idx)
                    total_loss += loss * len(idx)
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
        head_state = {n: t.detach().cpu().clone() for n, t in head.state_dict().items()}
        if full or cfg.refine_groups:
            result.state = join_groups({g: backbone.group_state(g) for g in trained}, head_state)
        else:
            result.state = join_state(backbone.group_state(k), head_state)
    return result, head

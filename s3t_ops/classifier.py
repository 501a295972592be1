"""The ordinary LoRA classifier and its training loop: frozen trunk + LoRA on the top `depth` groups + head.

It is the model not trained with S3T, shared by two users: memorization-based approximate unlearning (one model on
all the training data, docs/memorization.md) and, at depth L, the exact-unlearning baselines' ordinary LoRA model
(baselines/full_lora.py). It reuses the engine's Backbone (peft adapters g1..gL, group 1 = top blocks) and trunk
cache: the groups below `depth` stay untrained (identity), so the input of group `depth` is the cached frozen hidden
state and training only runs the top blocks. Its optimizer step is S3T's own (stages.gradient_step).

A model is a plain state dict (`g{k}.<lora key>` for k = 1..depth, `head.weight`, `head.bias`); the
Backbone is shared and mutable, so `MonolithicClassifier.load` must precede every use of a state.
Every training call forks the torch RNG and seeds it, and orders data by a hash of (seed, epoch, id)
(stages.epoch_order): results are deterministic and removing an example leaves the relative order of
the others unchanged.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from s3t_ops.backbone import Backbone, adapter_name, new_head
from s3t_ops.stages import depth_logits, epoch_order, gradient_step
from s3t_ops.trunk import TrunkCache

State = dict[str, torch.Tensor]


@dataclass
class LabeledTrunk:
    """Cached trunk rows with their labels (row r of `trunk` has label `labels[r]`)."""

    trunk: TrunkCache
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if len(self.labels) != len(self.trunk):
            raise ValueError(f"{len(self.trunk)} trunk rows but {len(self.labels)} labels")

    @classmethod
    def partial(cls, trunk: TrunkCache, ids: Sequence[str], labels: torch.Tensor) -> "LabeledTrunk":
        """`trunk` labelled only at `ids` (labels[j] belongs to ids[j]), without copying its hidden states.

        The other rows get -100, CrossEntropyLoss's ignore_index: a caller that trains on a shared trunk
        (the baselines train many subsets of one) only ever names the labelled rows."""
        full = torch.full((len(trunk),), -100, dtype=torch.long)
        full[trunk.rows(ids)] = torch.as_tensor(labels, dtype=torch.long)
        return cls(trunk, full)

    def __len__(self) -> int:
        return len(self.trunk)

    @property
    def ids(self) -> list[str]:
        return self.trunk.ids

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        return self.trunk.rows(ids)

    def label_of(self, ids: Sequence[str]) -> torch.Tensor:
        return self.labels.index_select(0, self.rows(ids))

    def subset(self, ids: Sequence[str]) -> "LabeledTrunk":
        rows = self.rows(ids)
        return LabeledTrunk(self.trunk.subset(list(ids)), self.labels.index_select(0, rows))

    def without(self, ids: Sequence[str]) -> "LabeledTrunk":
        gone = set(ids)
        return self.subset([i for i in self.ids if i not in gone])


@dataclass
class TrainResult:
    state: State
    seen_ids: set[str]  # every id that went through a gradient step
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    grad_example_steps: int = 0  # examples that went through a gradient step (epochs counted)
    seconds: float = 0.0


def split_groups(state: State, depth: int) -> tuple[list[State], State]:
    """A model state as (the LoRA state of groups 1..depth, the head state), prefixes stripped."""
    loras = []
    for k in range(1, depth + 1):
        prefix = f"g{k}."
        loras.append({key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)})
    return loras, {key[len("head."):]: t for key, t in state.items() if key.startswith("head.")}


class MonolithicClassifier:
    """Backbone groups 1..depth (LoRA) + a linear head, trained on cached trunk states."""

    def __init__(self, backbone: Backbone, num_labels: int, depth: int = 1):
        if not 1 <= depth <= backbone.layout.groups:
            raise ValueError(f"depth must be in 1..{backbone.layout.groups}, got {depth}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.depth = depth
        self.start = backbone.layout.start_block(depth)
        self.head = new_head(backbone.hidden_size, num_labels, 0)  # replaced by every init_state / load
        self.blocks = sorted(b for k in range(1, depth + 1) for b in backbone.layout.blocks(k))

    # --- state ------------------------------------------------------------------------------
    def group_seed(self, seed: int, k: int) -> int:
        """The seed of group k's fresh LoRA A in a model seeded `seed`."""
        return seed * 1000 + k

    def init_state(self, seed: int) -> State:
        """Fresh model: LoRA B = 0 (identity) in groups 1..depth, a new head; deterministic in `seed`."""
        for k in range(1, self.depth + 1):
            self.backbone.reset_group(k, self.group_seed(seed, k))
        self.head.load_state_dict(new_head(self.backbone.hidden_size, self.num_labels, seed).state_dict())
        return self.state()

    def begin(self, seed: int, init: State | None) -> None:
        """Load the starting model of a training run (called inside its seeded RNG): fresh from `seed`, or `init`."""
        if init is None:
            self.init_state(seed)
            self.backbone.activate(self.depth)
        else:
            self.load(init)

    def state(self) -> State:
        out: State = {}
        for k in range(1, self.depth + 1):
            for key, t in self.backbone.group_state(k).items():
                out[f"g{k}.{key}"] = t
        for key, t in self.head.state_dict().items():
            out[f"head.{key}"] = t.detach().clone()
        return out

    def load(self, state: State) -> None:
        loras, head = split_groups(state, self.depth)
        for k, lora in enumerate(loras, start=1):
            self.backbone.load_group(k, lora)
        self.head.load_state_dict(head)
        self.backbone.activate(self.depth)
        self.eval_mode()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Stable names (`g{k}.<peft name>`, `head.*`) for the LoRA of groups 1..depth and the head."""
        out = []
        for k in range(1, self.depth + 1):
            tag = f".{adapter_name(k)}."
            out += [(f"g{k}.{n}", p) for n, p in self.backbone.peft.named_parameters() if tag in n and "lora_" in n]
        out += [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        return out

    # --- modes ------------------------------------------------------------------------------
    def train_mode(self) -> None:
        """Dropout in the trained blocks and gradients for the LoRA + head; everything else frozen."""
        self.backbone.activate(self.depth)
        for _, p in self.named_trainable():
            p.requires_grad_(True)
        self.backbone.set_train_blocks(self.blocks)
        self.head.train()

    def eval_mode(self) -> None:
        for _, p in self.named_trainable():
            p.requires_grad_(False)
        self.backbone.peft.eval()
        self.head.eval()

    # --- forward ----------------------------------------------------------------------------
    def forward(self, data: LabeledTrunk, rows: torch.Tensor) -> torch.Tensor:
        h, mask = data.trunk.batch(rows, self.start, self.backbone.embed)
        return self.head(self.backbone.run_from(h, mask, self.start))

    def logits(self, state: State | None, data: LabeledTrunk, rows: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """Eval-mode logits of `state` (None: the loaded one) on `data` rows (all by default)."""
        return self.trunk_logits(state, data.trunk, rows, batch_size)

    def trunk_logits(self, state: State | None, trunk: TrunkCache, rows: torch.Tensor | None = None,
                     batch_size: int = 256) -> torch.Tensor:
        """`logits` on unlabelled trunk rows (evaluation splits of the baselines)."""
        if state is not None:
            self.load(state)
        self.eval_mode()
        rows = torch.arange(len(trunk)) if rows is None else rows
        return depth_logits(self.backbone, self.head, trunk, rows, self.depth, batch_size)


# --- training primitives --------------------------------------------------------------------
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic dropout without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_optimizer(params: Sequence[nn.Parameter], kind: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def batches(ids: Sequence[str], batch_size: int, seed: int, epoch: int) -> list[list[str]]:
    """This epoch's mini-batches of `ids`, ordered by a hash of (seed, epoch, id)."""
    order = epoch_order(list(ids), seed, epoch)
    ids = list(ids)
    return [[ids[j] for j in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]


def train_classifier(
    clf: MonolithicClassifier,
    data: LabeledTrunk,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    ids: Sequence[str] | None = None,
    init: State | None = None,
    on_logits: Callable[[list[str], torch.Tensor, torch.Tensor], None] | None = None,
    patience: int | None = None,
    optimizer: str = "adamw",
) -> TrainResult:
    """Cross-entropy training of the LoRA + head on `ids` (default: all of `data`): the one training loop of
    the monolithic model, the oracle, holdout retraining, the subsampled models and the baselines' LoRA model.

    init=None trains from scratch (fresh state from `seed`); otherwise continues from `init`.
    on_logits(ids, logits, labels) receives the logits of every training step itself (train mode,
    detached): the memorization proxies are logged from these.
    patience: stop after that many epochs without improvement of the epoch's training loss.
    """
    t0 = time.perf_counter()
    ids = list(data.ids if ids is None else ids)
    if not ids:
        raise ValueError("no training examples")
    loss_fn = nn.CrossEntropyLoss()
    with seeded(seed):
        clf.begin(seed, init)
        params = [p for _, p in clf.named_trainable()]
        opt = make_optimizer(params, optimizer, lr)
        result = TrainResult(state={}, seen_ids=set())
        best, stale = float("inf"), 0
        try:
            for epoch in range(epochs):
                clf.train_mode()
                total = 0.0
                for batch in batches(ids, batch_size, seed, epoch):
                    rows = data.rows(batch)
                    y = data.labels.index_select(0, rows)
                    logits = clf.forward(data, rows)
                    loss = gradient_step(opt, loss_fn, logits, y)
                    result.steps += 1
                    result.grad_example_steps += len(batch)
                    result.seen_ids.update(batch)
                    total += loss * len(batch)
                    if on_logits is not None:
                        on_logits(batch, logits.detach(), y)
                epoch_loss = total / len(ids)
                result.epoch_losses.append(epoch_loss)
                if patience is not None:
                    if epoch_loss < best:
                        best, stale = epoch_loss, 0
                    else:
                        stale += 1
                        if stale >= patience:
                            break
        finally:
            clf.eval_mode()
        result.state = clf.state()
    result.seconds = time.perf_counter() - t0
    return result

"""Approximate unlearning methods on a monolithic LoRA model, and the oracle (docs/memorization.md, "## Methods" and "## Metrics").

Every method starts from a model state and returns a new one; only the LoRA of the top groups and the
head move (the rest of the backbone is frozen, as in training). D = F ∪ R (forget, retain):
  none          the state unchanged
  finetune      CE on R                                     (catastrophic forgetting of F)
  neggrad       -CE on F                                    (gradient ascent)
  neggrad_plus  a·CE(R) - (1-a)·CE(F)                       (docs/memorization.md, "## RUM": RUM^F)
  l1_sparse     CE on R + gamma_t·||theta||_1, gamma_t = gamma·(1 - epoch/epochs)
  random_label  CE on F with uniformly random labels (redrawn every epoch) together with R
  salun         random_label, updating only the salient weights: the `saliency` fraction of trainable
                weights with the largest |gradient of CE(F)| at the starting state
  oracle        retrain from scratch on D \\ F (the reference every method is scored against)
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from s3t_ops.memorization.config import MethodConfig
from s3t_ops.classifier import LabeledTrunk, MonolithicClassifier, State, TrainResult, batches, make_optimizer, seeded, train_classifier


@dataclass
class UnlearnResult:
    state: State
    method: str
    n_forget: int
    n_retain: int
    steps: int = 0
    grad_example_steps: int = 0  # examples that went through a gradient step (epochs counted)
    seconds: float = 0.0


# --- pure pieces ----------------------------------------------------------------------------
def neggrad_plus_loss(retain_logits: torch.Tensor, retain_labels: torch.Tensor, forget_logits: torch.Tensor,
                      forget_labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """NegGrad+ (docs/memorization.md, "## RUM": RUM^F): a·CE(retain) - (1-a)·CE(forget), each CE a batch mean."""
    return alpha * F.cross_entropy(retain_logits, retain_labels) - (1.0 - alpha) * F.cross_entropy(forget_logits, forget_labels)


def l1_strength(gamma: float, epoch: int, epochs: int) -> float:
    """The l1-sparse schedule: gamma decays linearly from gamma (epoch 0) towards 0."""
    return gamma * (1.0 - epoch / epochs)


def l1_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((p.abs().sum() for p in params), torch.zeros(()))


def random_labels(n: int, num_labels: int, seed: int) -> torch.Tensor:
    """Uniform labels over all classes (as the random-label reference code draws them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_labels, (n,), generator=g)


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1 for the `fraction` of all entries (pooled over tensors) with the largest score, else 0."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, int(round(fraction * flat.numel())))
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape).float()
        start += s.numel()
    return out


# --- methods --------------------------------------------------------------------------------
def saliency_mask(clf: MonolithicClassifier, state: State, data: LabeledTrunk, forget_ids: Sequence[str],
                  fraction: float = 0.5, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency: |sum over forget batches of grad CE(F)| at `state`, top `fraction` kept."""
    clf.load(state)
    named = clf.named_trainable()
    for _, p in named:
        p.requires_grad_(True)
    grads = {n: torch.zeros_like(p) for n, p in named}
    try:
        for i in range(0, len(forget_ids), batch_size):
            batch = list(forget_ids[i:i + batch_size])
            rows = data.rows(batch)
            loss = F.cross_entropy(clf.forward(data, rows), data.labels.index_select(0, rows))
            for p in (p for _, p in named):
                p.grad = None
            loss.backward()
            for n, p in named:
                if p.grad is not None:
                    grads[n] += p.grad
    finally:
        for _, p in named:
            p.grad = None
        clf.eval_mode()
    return top_fraction_mask({n: g.abs() for n, g in grads.items()}, fraction)


def unlearn(clf: MonolithicClassifier, state: State, data: LabeledTrunk, forget_ids: Sequence[str],
            retain_ids: Sequence[str], mcfg: MethodConfig, seed: int = 0) -> UnlearnResult:
    """Apply one method to `state`: forget `forget_ids`, keep `retain_ids` (both ids of `data`)."""
    t0 = time.perf_counter()
    forget_ids, retain_ids = list(forget_ids), list(retain_ids)
    overlap = set(forget_ids) & set(retain_ids)
    if overlap:
        raise ValueError(f"{len(overlap)} id(s) are in both the forget and the retain set, e.g. {sorted(overlap)[:3]}")
    result = UnlearnResult(state=state, method=mcfg.method, n_forget=len(forget_ids), n_retain=len(retain_ids))
    if mcfg.method == "none" or not forget_ids:
        result.seconds = time.perf_counter() - t0
        return result
    mask = saliency_mask(clf, state, data, forget_ids, mcfg.saliency, mcfg.batch_size) if mcfg.method == "salun" else None
    with seeded(seed):
        clf.load(state)
        named = clf.named_trainable()
        params = [p for _, p in named]
        opt = make_optimizer(params, mcfg.optimizer, mcfg.lr, mcfg.momentum, mcfg.weight_decay)
        step_fn = _STEPS[mcfg.method]
        try:
            for epoch in range(mcfg.epochs):
                clf.train_mode()
                for loss, n_examples in step_fn(clf, data, forget_ids, retain_ids, mcfg, seed, epoch, params):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if mask is not None:
                        for name, p in named:
                            if p.grad is not None:
                                p.grad.mul_(mask[name])
                    opt.step()
                    result.steps += 1
                    result.grad_example_steps += n_examples
        finally:
            clf.eval_mode()
        result.state = clf.state()
    result.seconds = time.perf_counter() - t0
    return result


def _ce(clf, data, ids, labels=None):
    rows = data.rows(ids)
    y = data.labels.index_select(0, rows) if labels is None else labels
    return F.cross_entropy(clf.forward(data, rows), y)


def _finetune(clf, data, forget, retain, mcfg, seed, epoch, params):
    for batch in batches(retain, mcfg.batch_size, seed, epoch):
        yield _ce(clf, data, batch), len(batch)


def _neggrad(clf, data, forget, retain, mcfg, seed, epoch, params):
    for batch in batches(forget, mcfg.batch_size, seed, epoch):
        yield -_ce(clf, data, batch), len(batch)


def _neggrad_plus(clf, data, forget, retain, mcfg, seed, epoch, params):
    """One step per retain batch, each paired with the next forget batch (the forget batches cycle)."""
    f_batches = batches(forget, mcfg.batch_size, seed + 1, epoch)
    r_batches = batches(retain, mcfg.batch_size, seed, epoch) if retain else [[] for _ in f_batches]
    for r, f in zip(r_batches, itertools.cycle(f_batches)):
        f_rows = data.rows(f)
        f_logits = clf.forward(data, f_rows)
        f_y = data.labels.index_select(0, f_rows)
        if r:
            r_rows = data.rows(r)
            loss = neggrad_plus_loss(clf.forward(data, r_rows), data.labels.index_select(0, r_rows), f_logits, f_y, mcfg.alpha)
        else:
            loss = -(1.0 - mcfg.alpha) * F.cross_entropy(f_logits, f_y)
        yield loss, len(r) + len(f)


def _l1_sparse(clf, data, forget, retain, mcfg, seed, epoch, params):
    gamma = l1_strength(mcfg.alpha, epoch, mcfg.epochs)
    for batch in batches(retain, mcfg.batch_size, seed, epoch):
        yield _ce(clf, data, batch) + gamma * l1_norm(params), len(batch)


def _random_label(clf, data, forget, retain, mcfg, seed, epoch, params):
    relabel = dict(zip(forget, random_labels(len(forget), clf.num_labels, seed * 7919 + epoch).tolist()))
    for batch in batches(list(forget) + list(retain), mcfg.batch_size, seed, epoch):
        rows = data.rows(batch)
        y = data.labels.index_select(0, rows).clone()
        for j, i in enumerate(batch):
            if i in relabel:
                y[j] = relabel[i]
        yield F.cross_entropy(clf.forward(data, rows), y), len(batch)


_STEPS: dict[str, Callable] = {
    "finetune": _finetune,
    "neggrad": _neggrad,
    "neggrad_plus": _neggrad_plus,
    "l1_sparse": _l1_sparse,
    "random_label": _random_label,
    "salun": _random_label,
}


def oracle(clf: MonolithicClassifier, data: LabeledTrunk, forget_ids: Sequence[str], epochs: int, lr: float,
           batch_size: int, seed: int = 0, on_logits: Callable | None = None) -> TrainResult:
    """Retrain from scratch on D \\ F with the original recipe and seed (docs/memorization.md, "## Metrics": the oracle)."""
    gone = set(forget_ids)
    unknown = gone - set(data.ids)
    if unknown:
        raise KeyError(f"{len(unknown)} forget id(s) are not training examples, e.g. {sorted(unknown)[:3]}")
    keep = [i for i in data.ids if i not in gone]
    return train_classifier(clf, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, ids=keep, on_logits=on_logits)

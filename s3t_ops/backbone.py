"""A frozen pretrained encoder split into L groups of blocks, with one peft LoRA adapter per group.

Groups are counted from the top (group 1 = the last blocks), matching S3T's top-down stages. A group
whose adapter is not active is the frozen backbone itself, so the input of group k while groups
below it are untrained is the frozen backbone's own hidden state (see trunk.py).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from s3t_ops.config import S3TConfig
from s3t_ops.model_dir import (  # noqa: F401  (re-exported: the light half of the backbone)
    PACKAGED_MODEL, BackboneError, backbone_fingerprint, backbone_shape, fingerprint_dir, model_dir_for, packaged_model_dir)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

def adapter_name(group: int) -> str:
    return f"g{group}"


@dataclass(frozen=True)
class GroupLayout:
    """Which blocks form group k (1 = top). The `frozen` lowest blocks, and those left over by
    (n - frozen) % L, stay at the bottom, never adapted: their output is one cached trunk for every stage."""

    n_blocks: int
    groups: int
    frozen: int = 0

    @property
    def size(self) -> int:
        return (self.n_blocks - self.frozen) // self.groups

    def blocks(self, k: int) -> list[int]:
        if not 1 <= k <= self.groups:
            raise ValueError(f"group must be in 1..{self.groups}, got {k}")
        start = self.n_blocks - k * self.size
        return list(range(start, start + self.size))

    def start_block(self, k: int) -> int:
        """First block of group k: where a model of depth k starts from the frozen trunk."""
        return self.blocks(k)[0]

    def start_blocks(self) -> list[int]:
        return sorted(self.start_block(k) for k in range(1, self.groups + 1))


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> additive [B, 1, 1, T] mask, valid for eager and sdpa attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as all-MiniLM-L6-v2 defines it: masked mean over tokens."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Backbone:
    """Tokenizer + frozen encoder wrapped by peft with adapters g1..gL (one per group)."""

    def __init__(self, cfg: S3TConfig, model_dir: str | Path | None = None):
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        transformers.logging.set_verbosity_error()  # the pooler weights we drop are expected, not news
        transformers.logging.disable_progress_bar()

        self.cfg = cfg
        self.model_dir = Path(model_dir) if model_dir else model_dir_for(cfg)
        if not (self.model_dir / "config.json").is_file():
            raise BackboneError(f"backbone: {self.model_dir} holds no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        base = AutoModel.from_pretrained(str(self.model_dir), attn_implementation="eager", add_pooling_layer=False)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        n_blocks = len(base.encoder.layer)
        cfg.check_backbone(n_blocks, base.config.max_position_embeddings)
        self.layout = GroupLayout(n_blocks, cfg.slices, cfg.frozen_blocks)
        self.hidden_size = base.config.hidden_size
        self.fingerprint = fingerprint_dir(self.model_dir)
        model = None
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for k in range(1, cfg.slices + 1):
            lcfg = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
                layers_to_transform=self.layout.blocks(k),
                layers_pattern="layer",
                bias="none",
            )
            if model is None:
                model = get_peft_model(base, lcfg, adapter_name=adapter_name(k))
            else:
                model.add_adapter(adapter_name(k), lcfg)
        self.peft = model
        self.encoder = model.base_model.model  # the BertModel with LoRA layers injected
        self.device = placement(cfg.device)
        self.peft.to(self.device)
        self.peft.eval()
        self._freeze()

    # --- adapters -------------------------------------------------------------------------
    def _freeze(self) -> None:
        for p in self.peft.parameters():
            p.requires_grad_(False)

    def activate(self, depth: int) -> None:
        """Adapters of groups 1..depth on, the rest off (identity); everything frozen."""
        names = [adapter_name(k) for k in range(1, depth + 1)]
        self.peft.base_model.set_adapter(names if names else [adapter_name(1)])
        if not names:
            raise ValueError("depth must be >= 1")
        self._freeze()

    def group_parameters(self, k: int) -> list[nn.Parameter]:
        name = adapter_name(k)
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]

    def reset_group(self, k: int, seed: int) -> None:
        """Fresh LoRA for group k (B = 0: identity), A drawn from a generator seeded per stage."""
        from peft.tuners.lora import LoraLayer

        name = adapter_name(k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.encoder.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.reset_lora_parameters(name, True)

    def group_state(self, k: int) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.peft, adapter_name=adapter_name(k))
        return {key: t.detach().cpu().clone().contiguous() for key, t in sd.items()}  # saved from the CPU: canonical bytes

    def load_group(self, k: int, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft, state, adapter_name=adapter_name(k))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise BackboneError(f"checkpoint for group {k} has keys this backbone lacks: {unexpected[:3]}")

    # --- forward --------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), max_length=self.cfg.max_tokens, truncation=True, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer's output (block 0's input): what `trunk_states` returns for block 0, bit for bit."""
        return self.encoder.embeddings(input_ids=input_ids.to(self.device))

    @torch.no_grad()
    def trunk_states(self, input_ids: torch.Tensor, mask: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
        """Frozen hidden states entering each block in `blocks`, from one pass that stops at the deepest needed."""
        blocks = sorted(set(blocks))
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with self.peft.disable_adapter():
            h = self.encoder.embeddings(input_ids=input_ids)
            ext = extended_mask(mask, h.dtype)
            out: dict[int, torch.Tensor] = {}
            for b, layer in enumerate(self.encoder.encoder.layer[: blocks[-1] + 1]):
                if b in blocks:
                    out[b] = h
                if b == blocks[-1]:
                    break
                h = layer(h, attention_mask=ext)
        return out

    def run_from(self, h: torch.Tensor, mask: torch.Tensor, start_block: int) -> torch.Tensor:
        """Blocks start_block..n-1 with the currently active adapters, then mean pooling."""
        h, mask = h.to(self.device), mask.to(self.device)
        ext = extended_mask(mask, h.dtype)
        for layer in self.encoder.encoder.layer[start_block:]:
            h = layer(h, attention_mask=ext)
        return mean_pool(h, mask)

    def set_train_blocks(self, blocks: list[int]) -> None:
        """Dropout only in the blocks being trained; frozen groups behave as at inference."""
        self.peft.eval()
        for b in blocks:
            self.encoder.encoder.layer[b].train()


def placement(device: str) -> torch.device:
    """Where the backbone computes: the CPU, or a GPU with deterministic kernels (so that retraining a stage on the same
    GPU gives the bytes a training from scratch gives); `auto` picks cuda when torch sees one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError("device cuda: torch finds no GPU here (use --device cpu or auto)")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode, before CUDA starts
        torch.use_deterministic_algorithms(True)
    return torch.device(device)


def new_head(hidden: int, num_labels: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(hidden, num_labels)

"""Content-addressed stage checkpoints (as SISA's code names slice checkpoints).

A stage's key hashes its parent's key with the slice it adds and that slice's data version, so the
key names exactly the data and config the stage was trained on: an unchanged prefix keeps its key
and is never retrained, and a deletion changes the key of every stage that saw the example.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def root_key(training_fingerprint: str, backbone_fingerprint: str, shard: int, num_labels: int) -> str:
    return _h("root", training_fingerprint, backbone_fingerprint, shard, num_labels)


def stage_key(parent_key: str, slice_index: int, slice_version: str, stage: int) -> str:
    return _h("stage", parent_key, slice_index, slice_version, stage)


def stage_seed(base_seed: int, shard: int, prefix: tuple[int, ...]) -> int:
    """Seed per (shard, prefix): sequences that share a prefix share its stages (same data, same seed)."""
    return int(_h("seed", base_seed, shard, "-".join(map(str, prefix))), 16) % (2**31)


def _h(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


class CheckpointStore:
    """Safetensors files under a root folder, one per key; writes are atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {key} is missing at {path}")
        return load_file(str(path))

    def delete(self, key: str) -> bool:
        path = self.path(key)
        if path.is_file():
            path.unlink()
            return True
        return False


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Checkpoint -> (LoRA state of its group, head state)."""
    lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    return lora, head


def join_state(lora: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{f"lora.{k}": v for k, v in lora.items()}, **{f"head.{k}": v for k, v in head.items()}}

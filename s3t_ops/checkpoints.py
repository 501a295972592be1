"""Content-addressed stage checkpoints (as SISA's code names slice checkpoints), with integrity checks.

A stage's key hashes its parent's key with the slice it adds and that slice's data version, so the
key names exactly the data and config the stage was trained on: an unchanged prefix keeps its key
and is never retrained, and a deletion changes the key of every stage that saw the example.

Files are canonical: safetensors without metadata (its metadata dict is written in a random order
per process), so equal tensors give byte-equal files and the file's sha256, stored in the ledger row,
identifies the weights. Every load checks that hash: a damaged file is an `IntegrityError` naming it,
and the engine treats the stage as missing (retrained), never served.
"""
from __future__ import annotations

import hashlib
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

from s3t_ops.storage import Staged, Storage

if TYPE_CHECKING:  # torch is imported where tensors are made: honouring a deletion never needs it
    import torch


class IntegrityError(RuntimeError):
    """A checkpoint file does not hold the bytes its ledger row names (damaged or tampered with)."""


def root_key(training_fingerprint: str, backbone_fingerprint: str, shard: int, num_labels: int) -> str:
    return _h("root", training_fingerprint, backbone_fingerprint, shard, num_labels)


def stage_key(parent_key: str, slice_index: int, slice_version: str, stage: int) -> str:
    return _h("stage", parent_key, slice_index, slice_version, stage)


def stage_seed(base_seed: int, shard: int, prefix: tuple[int, ...]) -> int:
    """Seed per (shard, prefix): sequences that share a prefix share its stages (same data, same seed)."""
    return int(_h("seed", base_seed, shard, "-".join(map(str, prefix))), 16) % (2**31)


def _h(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


def canonical_bytes(state: dict[str, "torch.Tensor"]) -> bytes:
    from safetensors.torch import save as save_bytes

    return save_bytes({k: v.detach().contiguous() for k, v in sorted(state.items())})


class CheckpointFiles:
    """Safetensors files under `checkpoints/` of a `Storage`, one per key; writes are atomic, loads are verified."""

    PREFIX = "checkpoints"

    def __init__(self, storage: Storage):
        self.storage = storage
        self._verified: dict[str, tuple[Hashable, str]] = {}  # key -> (stamp, sha) already checked

    def _rel(self, key: str) -> str:
        return f"{self.PREFIX}/{key[:2]}/{key}.safetensors"

    def location(self, key: str) -> str:
        """Where a key's file is (a local path or an object URL), for messages."""
        return self.storage.location(self._rel(key))

    def path(self, key: str) -> Path:
        """The local file of a key (local storage only)."""
        return self.storage.local_path(self._rel(key))

    def exists(self, key: str) -> bool:
        return self.storage.exists(self._rel(key))

    def keys_on_disk(self) -> set[str]:
        return {rel.rsplit("/", 1)[-1].removesuffix(".safetensors") for rel in self.storage.glob(f"{self.PREFIX}/*/*.safetensors")}

    def stage(self, key: str, data: bytes) -> Staged:
        """A file to place under its key inside the ledger transaction that records it (`Ledger.record_checkpoint`)."""
        return self.storage.stage(self._rel(key), data)

    def read(self, key: str, sha256: str | None) -> bytes:
        """The file's bytes, checked against `sha256` (None: rows from before hashes were kept)."""
        try:
            data = self.storage.read_bytes(self._rel(key))
        except FileNotFoundError:
            raise IntegrityError(f"checkpoint file {self.location(key)} is missing") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"checkpoint file {self.location(key)} is damaged: its sha256 differs from the ledger's")
        return data

    def load(self, key: str, sha256: str | None) -> dict[str, "torch.Tensor"]:
        from safetensors.torch import load as load_bytes

        data = self.read(key, sha256)
        try:
            return load_bytes(data)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise IntegrityError(f"checkpoint file {self.location(key)} is damaged: {exc}") from None

    def intact(self, key: str, sha256: str | None) -> bool:
        """File present with the expected bytes; a check is remembered until the file changes."""
        stamp = self.storage.stamp(self._rel(key))
        if stamp is None:
            return False
        if self._verified.get(key) == (stamp, sha256 or ""):
            return True
        try:
            self.read(key, sha256)
        except IntegrityError:
            return False
        self._verified[key] = (stamp, sha256 or "")
        return True

    def rename(self, old: str, new: str) -> bool:
        """Move a file to another key (a ledger migration re-derived its key); idempotent: True when moved."""
        if not self.exists(old) or self.exists(new):
            return False
        self.storage.write_bytes(self._rel(new), self.storage.read_bytes(self._rel(old)))
        self.storage.remove(self._rel(old))
        self._verified.pop(old, None)
        return True

    def delete(self, key: str) -> bool:
        self._verified.pop(key, None)
        return self.storage.remove(self._rel(key))


def split_state(state: dict[str, "torch.Tensor"]) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
    """Checkpoint -> (LoRA state of its own group, head state)."""
    lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    return lora, head


def group_states(state: dict[str, "torch.Tensor"], stage: int) -> dict[int, dict[str, "torch.Tensor"]]:
    """The LoRA states a stage checkpoint holds, by group: {stage: ...} for a classic stage ("lora.*"),
    {1..stage: ...} for a stage that also refined the groups above it ("lora.g<i>.*", config refine_groups)."""
    out: dict[int, dict[str, "torch.Tensor"]] = {}
    for k, v in state.items():
        if k.startswith("lora.g") and k[6:].split(".", 1)[0].isdigit():
            g, rest = k[6:].split(".", 1)
            out.setdefault(int(g), {})[rest] = v
        elif k.startswith("lora."):
            out.setdefault(stage, {})[k[len("lora."):]] = v
    return out


def join_state(lora: dict[str, "torch.Tensor"], head: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    return {**{f"lora.{k}": v for k, v in lora.items()}, **{f"head.{k}": v for k, v in head.items()}}


def join_groups(loras: dict[int, dict[str, "torch.Tensor"]], head: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    return {**{f"lora.g{g}.{k}": v for g, lora in loras.items() for k, v in lora.items()},
            **{f"head.{k}": v for k, v in head.items()}}

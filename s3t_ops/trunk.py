"""Frozen-backbone hidden states at every group boundary, computed once per example.

While the groups below stage k are untrained they are the identity, so the input of group k is the
frozen backbone's hidden state: one pass per example serves every stage, sequence and shard.
Erasing an example rewrites the cache without its rows (physical removal, not a flag).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from s3t_ops.backbone import Backbone
from s3t_ops.files import write_atomic


@dataclass
class TrunkCache:
    ids: list[str]
    mask: torch.Tensor  # [N, T] int64
    hidden: dict[int, torch.Tensor]  # block -> [N, T, H]

    def __post_init__(self) -> None:
        self._row = {i: r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"not in the trunk cache: {missing[:5]}")
        return torch.tensor([self._row[i] for i in ids], dtype=torch.long)

    def batch(self, rows: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden[block].index_select(0, rows), self.mask.index_select(0, rows)

    def subset(self, ids: Sequence[str]) -> "TrunkCache":
        """These rows, in this order (KeyError naming ids the cache lacks)."""
        idx = self.rows(ids)
        return TrunkCache(list(ids), self.mask.index_select(0, idx), {b: h.index_select(0, idx) for b, h in self.hidden.items()})

    def without(self, ids: set[str]) -> "TrunkCache":
        keep = [r for r, i in enumerate(self.ids) if i not in ids]
        idx = torch.tensor(keep, dtype=torch.long)
        return TrunkCache([self.ids[r] for r in keep], self.mask.index_select(0, idx), {b: h.index_select(0, idx) for b, h in self.hidden.items()})

    @classmethod
    def concat(cls, parts: Sequence["TrunkCache"]) -> "TrunkCache":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no trunk rows to concatenate")
        ids = [i for p in parts for i in p.ids]
        blocks = parts[0].hidden.keys()
        return cls(ids, torch.cat([p.mask for p in parts]), {b: torch.cat([p.hidden[b] for p in parts]) for b in blocks})

    def save(self, path: Path) -> None:
        """Atomic: a crash leaves the previous cache intact."""
        tensors = {"mask": self.mask.contiguous(), **{f"h{b}": h.contiguous() for b, h in self.hidden.items()}}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"ids": json.dumps(self.ids)}))

    @staticmethod
    def read_ids(path: Path) -> list[str]:
        """The ids of a cache file from its header alone (erasure scans every file this way)."""
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["ids"])

    @classmethod
    def load(cls, path: Path) -> "TrunkCache":
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            mask = f.get_tensor("mask")
            hidden = {int(k[1:]): f.get_tensor(k) for k in f.keys() if k.startswith("h")}
        return cls(ids, mask, hidden)


def compute_trunk(
    backbone: Backbone,
    ids: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> TrunkCache:
    blocks = backbone.layout.start_blocks()
    masks: list[torch.Tensor] = []
    parts: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    for start in range(0, len(ids), batch_size):
        input_ids, mask = backbone.tokenize(list(texts[start:start + batch_size]))
        states = backbone.trunk_states(input_ids, mask, blocks)
        masks.append(mask)
        for b in blocks:
            parts[b].append(states[b])
        if progress:
            progress(len(input_ids))
    if not masks:
        t = backbone.cfg.max_tokens
        return TrunkCache([], torch.zeros(0, t, dtype=torch.long), {b: torch.zeros(0, t, backbone.hidden_size) for b in blocks})
    return TrunkCache(list(ids), torch.cat(masks), {b: torch.cat(p) for b, p in parts.items()})

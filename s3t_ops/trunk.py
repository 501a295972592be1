"""Frozen-backbone hidden states at every group boundary, computed once per example.

While the groups below stage k are untrained they are the identity, so the input of group k is the
frozen backbone's hidden state: one pass per example serves every stage, sequence and shard.
Erasing an example rewrites the cache without its rows (physical removal, not a flag). Files live in the
state's `Storage` (s3t_ops/storage.py): a local folder, or an object store.

Storage is kept small (it grows with the data: bytes per example are reported by `bytes_per_example`):
- a boundary at block 0 is the embedding layer's output, a per-token lookup: the cache keeps the token
  ids (int32) and recomputes it (bit for bit) instead of storing [T, H] floats;
- the other boundaries are stored in the config's `trunk_dtype` (float16 by default, half of
  float32's bytes at the same measured accuracy) and widened to float32 when read, so training always computes in float32;
- the attention mask as uint8.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from s3t_ops.backbone import Backbone
from s3t_ops.storage import Storage

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrunkCache:
    ids: list[str]
    mask: torch.Tensor  # [N, T]
    hidden: dict[int, torch.Tensor]  # block -> [N, T, H] (any float dtype; read as float32)
    input_ids: torch.Tensor | None = None  # [N, T]: block 0's input, recomputed by the embedding layer
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._row = {i: r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"not in the trunk cache: {missing[:5]}")
        return torch.tensor([self._row[i] for i in ids], dtype=torch.long)

    def blocks(self) -> list[int]:
        return sorted(set(self.hidden) | ({0} if self.input_ids is not None else set()))

    def batch(self, rows: torch.Tensor, block: int, embed: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 hidden state entering `block`, attention mask) of these rows; block 0 from the token
        ids needs `embed` (the backbone's embedding layer)."""
        rows = rows.to(self.mask.device)
        mask = self.mask.index_select(0, rows).long()
        if block in self.hidden:
            return self.hidden[block].index_select(0, rows).float(), mask
        if block == 0 and self.input_ids is not None:
            if embed is None:
                raise ValueError("this trunk cache keeps block 0 as token ids: pass the backbone's embedding")
            return embed(self.input_ids.index_select(0, rows).long()), mask
        raise KeyError(f"the trunk cache holds no boundary at block {block} (it has {self.blocks()})")

    def _take(self, idx: torch.Tensor, ids: list[str]) -> "TrunkCache":
        return TrunkCache(ids, self.mask.index_select(0, idx), {b: h.index_select(0, idx) for b, h in self.hidden.items()},
                          None if self.input_ids is None else self.input_ids.index_select(0, idx))

    def subset(self, ids: Sequence[str]) -> "TrunkCache":
        """These rows, in this order (KeyError naming ids the cache lacks)."""
        return self._take(self.rows(ids), list(ids))

    def without(self, ids: set[str]) -> "TrunkCache":
        keep = [r for r, i in enumerate(self.ids) if i not in ids]
        return self._take(torch.tensor(keep, dtype=torch.long), [self.ids[r] for r in keep])

    @classmethod
    def concat(cls, parts: Sequence["TrunkCache"]) -> "TrunkCache":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no trunk rows to concatenate")
        ids = [i for p in parts for i in p.ids]
        blocks = parts[0].hidden.keys()
        input_ids = None if parts[0].input_ids is None else torch.cat([p.input_ids for p in parts])
        return cls(ids, torch.cat([p.mask for p in parts]), {b: torch.cat([p.hidden[b] for p in parts]) for b in blocks}, input_ids)

    def nbytes(self) -> int:
        tensors = [self.mask, *self.hidden.values(), *([self.input_ids] if self.input_ids is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_bytes(self) -> bytes:
        """One safetensors file (the ids in its metadata): what `save` writes."""
        tensors = {"mask": self.mask.contiguous(), **{f"h{b}": h.contiguous() for b, h in self.hidden.items()}}
        if self.input_ids is not None:
            tensors["input_ids"] = self.input_ids.contiguous()
        return save_bytes(tensors, metadata={"ids": json.dumps(self.ids)})

    def save(self, storage: Storage, rel: str) -> None:
        """Atomic: a crash leaves the previous cache intact."""
        storage.write_bytes(rel, self.to_bytes())

    @staticmethod
    def read_ids(storage: Storage, rel: str) -> list[str]:
        """The ids of a cache file from its header alone (erasure scans every file this way)."""
        return _header_ids(lambda start, end: storage.read_range(rel, start, end))

    @classmethod
    def load(cls, storage: Storage, rel: str) -> "TrunkCache":
        """A local file is mapped (tensors read one by one); an object is read whole."""
        if storage.local:
            with safe_open(str(storage.local_path(rel)), framework="pt") as f:
                return cls._from(json.loads(f.metadata()["ids"]), {k: f.get_tensor(k) for k in f.keys()})
        data = storage.read_bytes(rel)
        return cls._from(_header_ids(lambda start, end: data[start:end]), load_bytes(data))

    @classmethod
    def _from(cls, ids: list[str], tensors: dict[str, torch.Tensor]) -> "TrunkCache":
        hidden = {int(k[1:]): t for k, t in tensors.items() if k.startswith("h")}
        return cls(ids, tensors["mask"], hidden, tensors.get("input_ids"))


def _header_ids(read: Callable[[int, int], bytes]) -> list[str]:
    """The ids in a safetensors header (`read(start, end)` gives those bytes): a little-endian u64 length, then
    the JSON header whose `__metadata__` holds them. Read this way, an object store is asked for the header only."""
    (size,) = struct.unpack("<Q", read(0, 8))
    return json.loads(json.loads(read(8, 8 + size))["__metadata__"]["ids"])


def bytes_per_example(cache: TrunkCache) -> float:
    return cache.nbytes() / max(1, len(cache))


def compute_trunk(
    backbone: Backbone,
    ids: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> TrunkCache:
    blocks = backbone.layout.start_blocks()
    stored = [b for b in blocks if b != 0]  # block 0 = the embedding output: kept as token ids
    dtype = DTYPES[backbone.cfg.trunk_dtype]
    masks: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    parts: dict[int, list[torch.Tensor]] = {b: [] for b in stored}
    for start in range(0, len(ids), batch_size):
        input_ids, mask = backbone.tokenize(list(texts[start:start + batch_size]))
        states = backbone.trunk_states(input_ids, mask, blocks)
        masks.append(mask.to(torch.uint8))
        tokens.append(input_ids.to(torch.int32))
        for b in stored:
            parts[b].append(states[b].to(dtype).cpu())  # kept on the CPU, whatever device computed it
        if progress:
            progress(len(input_ids))
    keep_ids = 0 in blocks
    if not masks:
        t = backbone.cfg.max_tokens
        return TrunkCache([], torch.zeros(0, t, dtype=torch.uint8), {b: torch.zeros(0, t, backbone.hidden_size, dtype=dtype) for b in stored},
                          torch.zeros(0, t, dtype=torch.int32) if keep_ids else None)
    return TrunkCache(list(ids), torch.cat(masks), {b: torch.cat(p) for b, p in parts.items()},
                      torch.cat(tokens) if keep_ids else None)

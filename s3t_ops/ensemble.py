"""Inference of a serving plan: one frozen trunk pass per input, each live shard's groups on top, logits averaged."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from s3t_ops.backbone import Backbone
from s3t_ops.checkpoints import split_state
from s3t_ops.planner import NoLiveShardError  # noqa: F401  (re-exported)
from s3t_ops.stages import depth_logits, load_prefix
from s3t_ops.trunk import TrunkCache


@dataclass
class ShardModel:
    shard: int
    depth: int
    states: list[dict[str, torch.Tensor]]  # stage checkpoints 1..depth of the chosen sequence


class Ensemble:
    def __init__(self, backbone: Backbone, shard_models: Sequence[ShardModel], num_labels: int):
        if not shard_models:
            raise NoLiveShardError("the serving plan has no live shard; retrain stages first")
        self.backbone = backbone
        self.models = list(shard_models)
        self.num_labels = num_labels

    def _activate(self, sm: ShardModel) -> nn.Linear:
        if len(sm.states) != sm.depth:
            raise ValueError(f"shard {sm.shard}: depth {sm.depth} but {len(sm.states)} checkpoints")
        load_prefix(self.backbone, sm.states)
        self.backbone.activate(self.backbone.cfg.active_groups(sm.depth))
        head = nn.Linear(self.backbone.hidden_size, self.num_labels)
        head.load_state_dict(split_state(sm.states[-1])[1])
        head.eval()
        return head.to(self.backbone.device)

    def shard_logits_from_trunk(self, trunk: TrunkCache, rows: torch.Tensor | None = None, batch_size: int = 256) -> dict[int, torch.Tensor]:
        rows = torch.arange(len(trunk)) if rows is None else rows
        out = {}
        for sm in self.models:
            head = self._activate(sm)
            out[sm.shard] = depth_logits(self.backbone, head, trunk, rows, self.backbone.cfg.active_groups(sm.depth), batch_size)
        return out

    def logits_from_trunk(self, trunk: TrunkCache, rows: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        return torch.stack(list(self.shard_logits_from_trunk(trunk, rows, batch_size).values())).mean(0)

    def shard_logits(self, texts: Sequence[str], batch_size: int = 256) -> dict[int, torch.Tensor]:
        """Shared trunk: the frozen pass runs once, only up to the deepest block any shard needs."""
        blocks = sorted({self.backbone.layout.start_block(self.backbone.cfg.active_groups(sm.depth)) for sm in self.models})
        input_ids, mask = self.backbone.tokenize(list(texts))
        hidden: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
        for i in range(0, len(input_ids), batch_size):
            states = self.backbone.trunk_states(input_ids[i:i + batch_size], mask[i:i + batch_size], blocks)
            for b in blocks:
                hidden[b].append(states[b])
        # kept where they were computed (a GPU's memory, on a GPU): the rows are looked up there too (TrunkCache.batch)
        trunk = TrunkCache([str(i) for i in range(len(input_ids))], mask.to(self.backbone.device), {b: torch.cat(h) for b, h in hidden.items()})
        return self.shard_logits_from_trunk(trunk, batch_size=batch_size)

    def logits(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return torch.stack(list(self.shard_logits(texts, batch_size).values())).mean(0)

    def shard_logits_separate(self, texts: Sequence[str], batch_size: int = 256) -> dict[int, torch.Tensor]:
        """Reference path: every shard model runs the whole network from the embeddings on its own."""
        input_ids, mask = self.backbone.tokenize(list(texts))
        out = {}
        for sm in self.models:
            head = self._activate(sm)
            parts = []
            with torch.no_grad():
                for i in range(0, len(input_ids), batch_size):
                    ids_b, mask_b = input_ids[i:i + batch_size], mask[i:i + batch_size]
                    h = self.backbone.encoder.embeddings(input_ids=ids_b)
                    parts.append(head(self.backbone.run_from(h, mask_b, 0)))
            out[sm.shard] = torch.cat(parts)
        return out

    def predict(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, probabilities) from averaged logits."""
        logits = self.logits(texts)
        return logits.argmax(-1), torch.softmax(logits, -1)

"""Partitions and the slice -> stage mapping that makes a deletion stale exactly the stages that saw it.

slice_data is partitioned by shard x slice, stage_k by shard x seq. stage_k depends on slice_data
through shard identity and slice -> the sequences holding that slice at a position <= k (a static
mapping: cyclic/tree/BMS sequences are the same for every shard).
"""
from __future__ import annotations

from collections.abc import Sequence

import warnings

import dagster as dg

# MultiPartitionMapping is marked beta; it is the mapping this design rests on (checked in tests).
warnings.filterwarnings("ignore", category=dg.BetaWarning)


def shard_key(s: int) -> str:
    return f"s{s}"


def slice_key(j: int) -> str:
    return f"j{j}"


def seq_key(q: int) -> str:
    return f"q{q}"


def parse_index(key: str) -> int:
    return int(key[1:])


class S3TPartitions:
    def __init__(self, shards: int, sequences: Sequence[Sequence[int]]):
        self.sequences = [tuple(p) for p in sequences]
        self.L = len(self.sequences[0])
        self.shards = dg.StaticPartitionsDefinition([shard_key(s) for s in range(shards)])
        self.slices = dg.StaticPartitionsDefinition([slice_key(j) for j in range(self.L)])
        self.seqs = dg.StaticPartitionsDefinition([seq_key(q) for q in range(len(self.sequences))])
        self.slice_def = dg.MultiPartitionsDefinition({"shard": self.shards, "slice": self.slices})
        self.stage_def = dg.MultiPartitionsDefinition({"shard": self.shards, "seq": self.seqs})

    def slice_to_seqs(self, k: int) -> dict[str, list[str]]:
        """Slice j -> sequences in which j sits at a (1-based) position <= k."""
        return {slice_key(j): [seq_key(q) for q, p in enumerate(self.sequences) if p.index(j) < k] for j in range(self.L)}

    def slice_mapping(self, k: int) -> dg.MultiPartitionMapping:
        return dg.MultiPartitionMapping({
            "shard": dg.DimensionPartitionMapping("shard", dg.IdentityPartitionMapping()),
            "slice": dg.DimensionPartitionMapping("seq", dg.StaticPartitionMapping(self.slice_to_seqs(k))),
        })

    @staticmethod
    def slice_partition(shard: int, slc: int) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({"shard": shard_key(shard), "slice": slice_key(slc)})

    @staticmethod
    def stage_partition(shard: int, seq: int) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({"shard": shard_key(shard), "seq": seq_key(seq)})

    @staticmethod
    def parse(key: str | dg.MultiPartitionKey) -> dict[str, int]:
        """"q0|s1" or a MultiPartitionKey -> {"seq": 0, "shard": 1}; the key prefixes name the dimensions."""
        dims = {"s": "shard", "j": "slice", "q": "seq"}
        parts = key.keys_by_dimension.values() if isinstance(key, dg.MultiPartitionKey) else str(key).split("|")
        try:
            return {dims[v[0]]: parse_index(v) for v in parts}
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"not an S3T partition key: {key!r}") from None

"""Baselines for exact unlearning, on the same data, backbone, trunk and ledger as S3T.

Every system exposes `fit()`, `forget(ids) -> ForgetCost` and `evaluate(split) -> accuracy`:
- `S3TSystem`: the engine itself (deactivation, optional retraining policy);
- `SISA`: same shards and slices, one sequence, incremental slice checkpoints;
- `FullRetrain`: one LoRA model on all data, retrained on every deletion;
- `PerShardLoRA`: m independent LoRA models.
"""
from s3t_ops.baselines.base import AGGREGATIONS, FitReport, ForgetCost, SharedData, UnlearningSystem, aggregate
from s3t_ops.baselines.full_lora import full_logits, train_full_lora
from s3t_ops.baselines.naive import train_stage_naive
from s3t_ops.baselines.per_shard import PerShardLoRA
from s3t_ops.baselines.retrain import FullRetrain
from s3t_ops.baselines.s3t import S3TSystem, S3TView
from s3t_ops.baselines.sisa import SISA, SISAReplicas

__all__ = ["AGGREGATIONS", "FitReport", "ForgetCost", "FullRetrain", "PerShardLoRA", "S3TSystem", "S3TView", "SISA", "SISAReplicas", "SharedData",
           "UnlearningSystem", "aggregate", "full_logits", "train_full_lora", "train_stage_naive"]

"""Memorization-aware approximate unlearning for models not trained with S3T (REFERENCE.md, "Memorization-based unlearning").

config.py   MemorizationConfig, MethodConfig (one unlearning step), the RUM schedules
model.py    the monolithic classifier (frozen trunk + LoRA on the top group(s) + head) and its training loop
proxies.py  confidence, max confidence, negative entropy, binary accuracy (running means from training
            logits), holdout retraining (symmetric KL after fine-tuning a copy on held-out data)
scores.py   true memorization: subsampled estimator, and the free estimate from the S3T checkpoint inventory
methods.py  fine-tune, NegGrad, NegGrad+, L1-sparse, random-label, SalUn; the oracle (retrain on D \\ F)
rum.py      RUM: bins by memorization rank, sequential low -> mid -> high; vanilla and shuffle controls
metrics.py  accuracy on forget / retain / test, SVC-MIA, ToW, ToW-MIA
workflow.py the flow: original model, score table, variants scored against the oracle
service.py  the state-folder doors: `s3t unlearn`, the Dagster memorization assets, MLflow runs, JSON + PNG
This package never imports dagster.
"""

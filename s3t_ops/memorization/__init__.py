"""Memorization-aware approximate unlearning for models not trained with S3T (docs/memorization.md, "## Memorization").

config.py   MemorizationConfig, MethodConfig (one unlearning step), the RUM schedules
(the monolithic classifier itself, frozen trunk + LoRA on the top group(s) + head, and its training loop are
s3t_ops/classifier.py: at depth L it is also the baselines' full LoRA model)
proxies.py  confidence, max confidence, negative entropy, binary accuracy (running means from training
            logits), holdout retraining (symmetric KL after fine-tuning a copy on held-out data)
scores.py   true memorization: subsampled estimator, and the free estimate from the S3T checkpoint inventory
methods.py  fine-tune, NegGrad, NegGrad+, L1-sparse, random-label, SalUn; the oracle (retrain on D \\ F)
rum.py      RUM: bins by memorization rank, sequential low -> mid -> high; vanilla and shuffle controls
metrics.py  accuracy on forget / retain / test, SVC-MIA, ToW, ToW-MIA
workflow.py the computation, free of files: original model, score table, variants scored against the oracle
service.py  the one path both doors take (`s3t unlearn`, the Dagster memorization assets), MLflow runs
report.py   how a result reads: the printed table and the ToW figure
artifacts.py every file under memorization/ in the state's storage (layout, ids of each artifact, how an
            artifact is committed) and its erasure (`erase`, given to every state as its ERASER)
This package never imports dagster.
"""

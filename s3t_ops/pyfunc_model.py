"""The registered ensemble's pyfunc body: the plan's checkpoints on the configured backbone, shared-trunk inference.

MLflow runs pyfunc_entry.py (models from code: nothing is pickled) when a version is loaded; that file builds this
class. Every checkpoint file of the version is checked against the sha256 its plan recorded before it is loaded: a
damaged copy is refused, never served (`s3t status` re-publishes it). A loaded version is pinned: it does not follow
later deletions (`s3t serve` does).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from s3t_ops.tracker import quiet_mlflow, verify_copy

quiet_mlflow()
with warnings.catch_warnings():  # mlflow's own pyfunc classes nag about type hints on import
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc


_show = warnings.showwarning
# mlflow nags about type hints when the class is created, under its own "once" filter (so no filter of ours reaches
# it): the warning is dropped by its display hook for this one statement; inputs are checked in `predict`
warnings.showwarning = lambda *args, **kwargs: None
try:
    class S3TEnsembleModel(mlflow.pyfunc.PythonModel):
        """Pyfunc body: the plan's checkpoints on the configured backbone, shared-trunk inference."""

        def load_context(self, context) -> None:
            from safetensors.torch import load_file

            from s3t_ops.backbone import Backbone
            from s3t_ops.config import S3TConfig
            from s3t_ops.ensemble import Ensemble, ShardModel

            meta = json.loads(Path(context.artifacts["meta"]).read_text())
            record = json.loads(Path(context.artifacts["plan"]).read_text())
            ckpt_dir = Path(context.artifacts["checkpoints"])
            damaged = verify_copy(ckpt_dir, record)
            if damaged:  # never predict from a file that is not the one the plan names
                raise ValueError(f"registered S3T model, plan {record.get('plan_id')}: checkpoint file(s) {', '.join(damaged)} "
                                 "do not hold the bytes the plan recorded (damaged copy); refusing to serve it — "
                                 "`s3t repair` re-publishes the plan")
            cfg = S3TConfig.from_dict({**meta["config"], "state_dir": tempfile.gettempdir()})
            self.label_names = list(meta["label_names"])
            backbone = Backbone(cfg)
            models = [ShardModel(int(s), len(keys), [load_file(str(ckpt_dir / f"{k}.safetensors")) for k in keys])
                      for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]
            self.ensemble = Ensemble(backbone, models, len(self.label_names))

        def predict(self, context, model_input, params=None):
            if isinstance(model_input, pd.DataFrame):
                if "text" not in model_input.columns:
                    raise ValueError("input needs a `text` column")
                texts = model_input["text"].astype(str).tolist()
            else:
                texts = [str(t) for t in model_input]
            labels, probs = self.ensemble.predict(texts)
            out = pd.DataFrame({"label": [self.label_names[i] for i in labels.tolist()]})
            for j, name in enumerate(self.label_names):
                out[f"prob_{name}"] = probs[:, j].double().numpy()
            return out
finally:
    warnings.showwarning = _show

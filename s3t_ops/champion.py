"""Load the served model as the registry has it: `load_champion(...).predict(DataFrame(text=...))` -> label +
prob_<class>. A loaded model is pinned to the version it loaded: it does not follow later deletions (`s3t serve`
does, README "Load the champion")."""
from __future__ import annotations

import warnings

from s3t_ops.tracker import CHAMPION, use_tracking_uri


def load_champion(model_name: str = "s3t-ensemble", tracking_uri: str | None = None):
    """The served model as the registry has it: `predict(DataFrame(text=...))` -> label + prob_<class>."""
    import mlflow
    import mlflow.pyfunc

    if tracking_uri:
        use_tracking_uri(tracking_uri)
    with warnings.catch_warnings():  # loading the model class nags about type hints on `predict`
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")

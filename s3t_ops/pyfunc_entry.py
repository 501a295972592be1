"""Models-from-code entry of the registered ensemble: MLflow executes this file when it loads the model,
so nothing is pickled (the class lives in s3t_ops.pyfunc_model, the weights in the model's artifacts)."""
import mlflow

from s3t_ops.pyfunc_model import S3TEnsembleModel

mlflow.models.set_model(S3TEnsembleModel())

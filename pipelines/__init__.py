"""Dagster wiring for the S3T engine (thin: every asset calls one engine operation)."""

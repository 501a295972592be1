"""Helpers for tests that compare whole state folders: file hashes, byte scans, the CLI in a subprocess."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hash_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (the state 'exactly as it was')."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def byte_scan(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    """(file, needle) for every file under root that holds one of the needles' UTF-8 bytes."""
    hits = []
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [(str(p), n) for n in needles if n.encode("utf-8") in data]
    return hits


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3T_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    return env


def run_cli(args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """`s3t ARGS` in a fresh process (so a crash point can SIGKILL it), one torch thread."""
    code = "import sys; from s3t_ops.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**env), cwd=ROOT)


def copy_state(src: Path, dst: Path) -> Path:
    """A copy of a state folder that is a state of its own: the MLflow SQLite store names its artifact folders
    by absolute path, so those paths are rewritten to the copy's."""
    import shutil
    import sqlite3

    shutil.copytree(src, dst)
    db = Path(dst) / "mlflow.db"
    if db.exists():
        old, new = str(Path(src).resolve()), str(Path(dst).resolve())
        con = sqlite3.connect(db)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for t in tables:
                cols = [r[1] for r in con.execute(f"PRAGMA table_info('{t}')") if "CHAR" in r[2].upper() or "TEXT" in r[2].upper()]
                for c in cols:
                    con.execute(f'UPDATE "{t}" SET "{c}" = replace("{c}", ?, ?) WHERE "{c}" LIKE ?', [old, new, f"%{old}%"])
            con.commit()
        finally:
            con.close()
    return Path(dst)


def tiny_world(root: Path, backbone_dir: Path, n: int, state: str = "state", **changes):
    """A new state in `root` on the tiny BERT: m=2, L=2, B=2, one epoch, n toy examples (8 val, 8 test) in
    `root/toy.csv`. Torch runs on one thread. Returns (S3TConfig, path of the CSV)."""
    import torch

    from s3t_ops.config import S3TConfig
    from tests.conftest import toy_frame

    torch.set_num_threads(1)
    data = Path(root) / "toy.csv"
    toy_frame(n).to_csv(data, index=False)
    values = dict(shards=2, slices=2, budget=2, epochs=1, batch_size=8, max_tokens=16, lora_rank=4, lora_alpha=8,
                  n_train=None, n_val=8, n_test=8, backbone=str(backbone_dir), state_dir=Path(root) / state)
    return S3TConfig(**{**values, **changes}), data

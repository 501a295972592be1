"""Command-line arguments the `s3t` commands share (the state folder, files of ids), for the CLI and the commands
packages add to it (memorization/cli.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default=os.environ.get("S3T_STATE", "s3t_state"),
                   help="state folder: ledger, trunk cache, checkpoints, registry (default: $S3T_STATE or ./s3t_state)")


def read_id_file(name: str) -> list[str]:
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file of ids")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        import io

        import pandas as pd

        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise ValueError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
        if "id" not in frame.columns:
            raise ValueError(f"{path}: needs an `id` column (found {', '.join(frame.columns) or 'none'})")
        ids = frame["id"].str.strip()
        blank = [i + 2 for i, v in enumerate(ids) if not v]  # +2: header line, 1-based
        if blank:
            raise ValueError(f"{path}: blank id on line(s) {blank[:5]}; nothing was deleted")
        return ids.tolist()
    return [line.strip() for line in text.splitlines() if line.strip()]

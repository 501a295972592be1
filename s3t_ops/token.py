"""The bearer token of a state's server (`s3t serve`): its `/forget` changes the state, so it needs one.

A random token is created with the state (`server.token`, readable by its owner only); a server started with
`--token-file` reads that file instead. Without a token file `/forget` is off.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from s3t_ops.files import write_atomic

TOKEN_FILE = "server.token"


def create_token(state_dir: Path) -> Path:
    token = secrets.token_hex(32)

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")

    return write_atomic(Path(state_dir) / TOKEN_FILE, write)


def read_token(path: Path) -> str | None:
    """The token in a file (None: no such file, so no `/forget`); a file that is not owner-only is refused."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others: `chmod 600 {path}` (a token that others can read protects nothing)")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"{path} holds no usable token (at least 16 characters)")
    return token

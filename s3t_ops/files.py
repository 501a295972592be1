"""Atomic file writes for everything in a state folder (and for the data files when they are local: s3t_ops/storage.py).

A file is written under `<name>.tmp-<pid>`, flushed to disk, then renamed over its final name: after a
crash either the old or the new content is in place, never half of it. Leftover temporaries are
removed by `remove_temporaries` when a state is opened (repair).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file; it then replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def alive(pid: int) -> bool:
    """Whether process `pid` may still write: a zombie (dead, not yet reaped, as a killed pool worker is for a
    moment once its parent died too) writes nothing more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): signal 0 is all we know
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def remove_temporaries(root: Path | None) -> list[Path]:
    """Delete `*.tmp-<pid>` files (and staging folders) that a crashed writer left under `root`: never a
    finished file, and never the temporary of a process that is still running (it may be about to use it)."""
    import shutil

    removed = []
    if root is None or not Path(root).is_dir():
        return removed
    for p in sorted(Path(root).rglob(f"*{TMP_MARK}*")):  # listed first: removing a folder must not disturb the walk
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
        if not (pid.isdigit() and not alive(int(pid))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed

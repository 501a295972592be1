"""The state's own MLflow SQLite store, read and re-rooted with sqlite3 alone (no MLflow import on a command's path).

MLflow writes absolute artifact locations into its store (`file:///.../<state>/mlartifacts/...` in experiments,
runs, logged models and model versions). A state folder that was moved or copied would otherwise keep erasing
and publishing under its old path, which MLflow even creates again. Opening a state compares the location its
experiment records with where the folder is now and rewrites every such path to the new place, so a moved or
copied state only ever touches files inside itself (docs/lifecycle.md, "A portable state").
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

ARTIFACTS = "mlartifacts"


def recorded_root(db: Path, experiment: str = "s3t") -> str | None:
    """The state folder the store's experiment keeps its artifacts under (None: no such experiment or a server's)."""
    if not db.is_file():
        return None
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", [experiment]).fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    if not row or not row[0]:
        return None
    location = str(row[0]).removeprefix("file://")
    if not location.endswith(f"/{ARTIFACTS}"):
        return None
    return location[: -len(ARTIFACTS) - 1]


def reroot(db: Path, old_root: str, new_root: str) -> int:
    """Rewrite `<old_root>/mlartifacts` into `<new_root>/mlartifacts` in every text column of the store, in one
    transaction (a crash leaves the old paths, and the next open rewrites them). Returns the cells changed."""
    old, new = f"{old_root.rstrip('/')}/{ARTIFACTS}", f"{new_root.rstrip('/')}/{ARTIFACTS}"
    con = sqlite3.connect(db)
    changed = 0
    try:
        with con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')
                        if any(t in (r[2] or "").upper() for t in ("CHAR", "TEXT", "CLOB"))]
                for col in cols:
                    cur = con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                                      [old, new, old])
                    changed += cur.rowcount
    finally:
        con.close()
    return changed

"""DuckDB ledger: examples, slice versions and members, deletion requests, stage lineage, served plans.

DuckDB allows one read-write process per file, so every call opens a short connection (retried while
another process holds the lock) and writes happen in single transactions: a failed call leaves
nothing half-written.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd

from s3t_ops.partition import slice_version

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS examples (
    id VARCHAR PRIMARY KEY, text VARCHAR, label INTEGER, split VARCHAR, shard INTEGER, slice INTEGER);
CREATE TABLE IF NOT EXISTS slice_versions (
    version VARCHAR, shard INTEGER, slice INTEGER, n_members INTEGER, created_at TIMESTAMP,
    PRIMARY KEY (shard, slice, version));
CREATE TABLE IF NOT EXISTS slice_members (version VARCHAR, shard INTEGER, slice INTEGER, example_id VARCHAR);
CREATE TABLE IF NOT EXISTS deletions (
    example_id VARCHAR PRIMARY KEY, split VARCHAR, shard INTEGER, slice INTEGER,
    requested_at TIMESTAMP, honoured_at TIMESTAMP, honoured_by_plan INTEGER, retrained_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS checkpoints (
    key VARCHAR PRIMARY KEY, shard INTEGER, prefix VARCHAR, stage INTEGER, parent_key VARCHAR,
    slice INTEGER, slice_version VARCHAR, path VARCHAR, n_train INTEGER, grad_example_steps BIGINT,
    steps INTEGER, val_acc DOUBLE, seconds DOUBLE, created_at TIMESTAMP, purged_at TIMESTAMP);
CREATE SEQUENCE IF NOT EXISTS plan_ids START 1;
CREATE TABLE IF NOT EXISTS plans (
    plan_id INTEGER PRIMARY KEY, created_at TIMESTAMP, plan VARCHAR, n_live INTEGER, n_deletions INTEGER);
"""


class UnknownExampleError(KeyError):
    """Ids that the ledger never held; nothing was written."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class ForgetReceipt:
    new: tuple[str, ...]  # newly deleted now
    already: tuple[str, ...]  # deleted by an earlier request (idempotent)
    dirty: tuple[tuple[int, int], ...]  # (shard, slice) whose data version changed


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Ledger:
    def __init__(self, path: str | Path, retries: int = 50, wait_s: float = 0.1):
        self.path = Path(path)
        self.retries = retries
        self.wait_s = wait_s
        self._session: duckdb.DuckDBPyConnection | None = None

    @contextmanager
    def session(self) -> Iterator["Ledger"]:
        """One read-write connection for a burst of calls (opening one costs ~10 ms): the honour path
        of a deletion runs in a session so it stays in milliseconds. Other processes wait meanwhile."""
        if self._session is not None:
            yield self
            return
        with self.connect() as con:
            self._session = con
            try:
                yield self
            finally:
                self._session = None

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection; waits while another process holds the file lock."""
        if self._session is not None:
            yield self._session
            return
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"no ledger at {self.path}: run `s3t demo` or ingest first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:  # "Could not set lock on file"
                last = exc
                time.sleep(self.wait_s * min(1 + attempt, 10))
        else:
            raise RuntimeError(f"ledger {self.path} stayed locked by another process") from last
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def init(self) -> None:
        with self.connect() as con:
            con.execute(SCHEMA)

    def exists(self) -> bool:
        return self.path.exists()

    # --- meta -----------------------------------------------------------------------------
    def set_meta(self, key: str, value: object) -> None:
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def get_meta(self, key: str, default: object = None) -> object:
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
        return json.loads(rows[0][0]) if rows else default

    # --- examples and slices ----------------------------------------------------------------
    def add_examples(self, frame: pd.DataFrame) -> None:
        """Ingest once: examples with id, text, label, split, shard, slice (shard/slice null off train)."""
        cols = ["id", "text", "label", "split", "shard", "slice"]
        data = frame[cols].copy()
        with self.transaction() as con:
            n = con.execute("SELECT count(*) FROM examples").fetchall()[0][0]
            if n:
                raise RuntimeError(f"ledger {self.path} already holds {n} examples; use a new state folder")
            con.register("incoming", data)
            con.execute("INSERT INTO examples SELECT id, text, label, split, shard, slice FROM incoming")
            con.unregister("incoming")
            train = data[data["split"] == "train"]
            for (s, j), members in train.groupby(["shard", "slice"]):
                self._record_version(con, int(s), int(j), members["id"].tolist())

    def _record_version(self, con: duckdb.DuckDBPyConnection, shard: int, slc: int, ids: Sequence[str]) -> str:
        version = slice_version(ids)
        exists = con.execute("SELECT 1 FROM slice_versions WHERE shard=? AND slice=? AND version=?", [shard, slc, version]).fetchall()
        if not exists:
            con.execute("INSERT INTO slice_versions VALUES (?, ?, ?, ?, ?)", [version, shard, slc, len(ids), now()])
            rows = pd.DataFrame({"version": version, "shard": shard, "slice": slc, "example_id": list(ids)})
            con.register("members", rows)
            con.execute("INSERT INTO slice_members SELECT version, shard, slice, example_id FROM members")
            con.unregister("members")
        return version

    def examples(self, split: str | None = None) -> pd.DataFrame:
        """Live examples (deleted ones are physically gone)."""
        with self.connect(read_only=True) as con:
            if split is None:
                return con.execute("SELECT * FROM examples ORDER BY id").df()
            return con.execute("SELECT * FROM examples WHERE split = ? ORDER BY id", [split]).df()

    def slice_versions(self, shards: int, slices: int) -> dict[tuple[int, int], str]:
        """Current data version of every (shard, slice), from its live members."""
        train = self.examples("train")
        out = {}
        groups = {k: g["id"].tolist() for k, g in train.groupby(["shard", "slice"])}
        for s in range(shards):
            for j in range(slices):
                out[(s, j)] = slice_version(groups.get((s, j), []))
        return out

    def slice_counts(self) -> pd.DataFrame:
        with self.connect(read_only=True) as con:
            return con.execute(
                "SELECT shard, slice, count(*) AS n_live FROM examples WHERE split='train' GROUP BY ALL ORDER BY ALL"
            ).df()

    # --- deletions --------------------------------------------------------------------------
    def forget(self, ids: Iterable[str], compact: bool = True) -> ForgetReceipt:
        """Record requests and physically remove the examples, in one transaction (idempotent).

        `compact=False` defers rewriting the file (the caller must `compact()` soon after): the engine
        serves the new plan first and erases the bytes right after, so honouring stays instant.
        """
        wanted = list(dict.fromkeys(str(i).strip() for i in ids))
        if not wanted:
            raise ValueError("no example ids given")
        with self.transaction() as con:
            q = pd.DataFrame({"id": wanted})
            con.register("wanted", q)
            live = con.execute("SELECT e.id, e.split, e.shard, e.slice FROM examples e JOIN wanted w USING (id)").df()
            done = set(con.execute("SELECT example_id FROM deletions JOIN wanted w ON w.id = example_id").df()["example_id"])
            con.unregister("wanted")
            unknown = sorted(set(wanted) - set(live["id"]) - done)
            if unknown:
                shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise UnknownExampleError(f"{len(unknown)} unknown example id(s): {shown}; nothing was deleted")
            t = now()
            for row in live.itertuples(index=False):
                con.execute(
                    "INSERT INTO deletions VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)",
                    [row.id, row.split, None if pd.isna(row.shard) else int(row.shard), None if pd.isna(row.slice) else int(row.slice), t],
                )
            con.register("gone", live[["id"]])
            con.execute("DELETE FROM examples WHERE id IN (SELECT id FROM gone)")
            con.unregister("gone")
            dirty = sorted({(int(r.shard), int(r.slice)) for r in live.itertuples() if r.split == "train"})
            for s, j in dirty:
                members = con.execute("SELECT id FROM examples WHERE shard=? AND slice=? AND split='train'", [s, j]).df()["id"].tolist()
                self._record_version(con, s, j, members)
        if len(live) and compact:
            self.compact()  # CHECKPOINT alone leaves the deleted text in freed blocks of the file
        return ForgetReceipt(new=tuple(live["id"]), already=tuple(sorted(done)), dirty=tuple(dirty))

    def compact(self) -> None:
        """Rewrite the ledger into a fresh file and swap it in, holding the lock on the old one.

        DuckDB neither rewrites a row group for a few deleted rows nor zeroes freed blocks, so a deleted
        example's text stays readable in the file until the database is copied.
        """
        tmp = self.path.with_name(self.path.name + ".compact")
        tmp.unlink(missing_ok=True)
        with self.connect() as con:
            con.execute("CHECKPOINT")
            name = con.execute("SELECT current_database()").fetchall()[0][0]
            con.execute(f"ATTACH '{str(tmp).replace(chr(39), chr(39) * 2)}' AS s3t_compact")
            try:
                con.execute(f'COPY FROM DATABASE "{name}" TO s3t_compact')
                con.execute("DETACH s3t_compact")
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def deletions(self) -> pd.DataFrame:
        with self.connect(read_only=True) as con:
            return con.execute("SELECT * FROM deletions ORDER BY requested_at, example_id").df()

    def deleted_ids(self) -> set[str]:
        return set(self.deletions()["example_id"])

    def mark_honoured(self, plan_id: int) -> int:
        with self.connect() as con:
            return con.execute(
                "UPDATE deletions SET honoured_at = ?, honoured_by_plan = ? WHERE honoured_at IS NULL", [now(), plan_id]
            ).fetchall()[0][0]

    def mark_retrained(self) -> None:
        with self.connect() as con:
            con.execute("UPDATE deletions SET retrained_at = ? WHERE retrained_at IS NULL", [now()])

    # --- checkpoints ------------------------------------------------------------------------
    def record_checkpoint(self, row: dict) -> None:
        cols = ["key", "shard", "prefix", "stage", "parent_key", "slice", "slice_version", "path", "n_train",
                "grad_example_steps", "steps", "val_acc", "seconds"]
        with self.connect() as con:
            con.execute(
                f"INSERT OR REPLACE INTO checkpoints ({', '.join(cols)}, created_at, purged_at) VALUES ({', '.join('?' * len(cols))}, ?, NULL)",
                [row[c] for c in cols] + [now()],
            )

    def checkpoints(self, live_only: bool = True) -> pd.DataFrame:
        with self.connect(read_only=True) as con:
            where = "WHERE purged_at IS NULL" if live_only else ""
            return con.execute(f"SELECT * FROM checkpoints {where} ORDER BY shard, prefix").df()

    def mark_purged(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self.connect() as con:
            con.register("purged", pd.DataFrame({"key": list(keys)}))
            con.execute("UPDATE checkpoints SET purged_at = ? WHERE key IN (SELECT key FROM purged)", [now()])
            con.unregister("purged")

    def lineage_ids(self, key: str) -> set[str]:
        """Every example id a checkpoint was trained on: the members of the slice versions up its parent chain."""
        with self.connect(read_only=True) as con:
            rows = con.execute(
                """
                WITH RECURSIVE chain(key, parent_key, shard, slice, slice_version) AS (
                    SELECT key, parent_key, shard, slice, slice_version FROM checkpoints WHERE key = ?
                    UNION ALL
                    SELECT c.key, c.parent_key, c.shard, c.slice, c.slice_version FROM checkpoints c JOIN chain ON c.key = chain.parent_key
                )
                SELECT DISTINCT m.example_id FROM chain JOIN slice_members m
                  ON m.version = chain.slice_version AND m.shard = chain.shard AND m.slice = chain.slice
                """,
                [key],
            ).fetchall()
        return {r[0] for r in rows}

    # --- plans ------------------------------------------------------------------------------
    def record_plan(self, plan: dict, n_live: int) -> int:
        with self.connect() as con:
            n_del = con.execute("SELECT count(*) FROM deletions").fetchall()[0][0]
            pid = con.execute(
                "INSERT INTO plans VALUES (nextval('plan_ids'), ?, ?, ?, ?) RETURNING plan_id", [now(), json.dumps(plan), n_live, n_del]
            ).fetchall()[0][0]
        return int(pid)

    def latest_plan(self) -> tuple[int, dict] | None:
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT plan_id, plan FROM plans ORDER BY plan_id DESC LIMIT 1").fetchall()
        return (int(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def plan(self, plan_id: int) -> dict | None:
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT plan FROM plans WHERE plan_id = ?", [int(plan_id)]).fetchall()
        return json.loads(rows[0][0]) if rows else None

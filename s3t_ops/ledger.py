"""DuckDB ledger: examples, slice versions, deletion requests, stage lineage, served and published plans.

It is long because it is the one module that knows the schema: every SQL statement of a state is here, so each
transaction's guarantee (below) can be read, and tested, in one place.

Why it looks like this:
- DuckDB allows one read-write process per file. Every process first takes an advisory lock on
  `ledger.duckdb.lock` (waiting up to `wait_s`), then opens a short connection, so processes queue
  instead of failing, and the file can be swapped (compaction) while nobody has it open.
- Every state change is one transaction. Honouring a deletion (`honour`) writes the deletion rows,
  removes the examples, records the new slice versions, the new serving plan and the honoured marks
  in ONE transaction: after a crash a request is either absent or honoured by the served plan.
- What follows honouring is driven by the ledger and idempotent: deletions with `erased_at IS NULL`
  are erased by the next command that opens the state; plans with `published_at IS NULL` are
  published to the registry; checkpoint files without a row are orphans.
- Deleted ids are kept only as keyed tombstones (see tombstones.py), and so are the members of old
  slice versions (the lineage the exactness audit reads).
- A damaged file is reported (`LedgerDamagedError`) by a read-only scan before anything writes to it.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd

from s3t_ops.faults import crash_point
from s3t_ops.files import write_json
from s3t_ops.tombstones import Keyring

SCHEMA_VERSION = 3
POINTER = "served-plan.json"  # beside the ledger: the plan in force, for servers (`_point`)
MIGRATABLE = (2,)  # older schemas `migrate_v2` brings up to date (schema 2: slice versions were plain hashes)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS examples (
    id VARCHAR PRIMARY KEY, text VARCHAR, label INTEGER, split VARCHAR, shard INTEGER, slice INTEGER);
CREATE TABLE IF NOT EXISTS slice_versions (
    version VARCHAR, shard INTEGER, slice INTEGER, n_members INTEGER, created_at TIMESTAMP, is_current BOOLEAN,
    PRIMARY KEY (shard, slice, version));
CREATE TABLE IF NOT EXISTS slice_members (version VARCHAR, shard INTEGER, slice INTEGER, member VARCHAR);
CREATE TABLE IF NOT EXISTS deletions (
    tombstone VARCHAR PRIMARY KEY, split VARCHAR, shard INTEGER, slice INTEGER, requested_at TIMESTAMP,
    honoured_at TIMESTAMP, honoured_by_plan INTEGER, erased_at TIMESTAMP, retrained_at TIMESTAMP, request VARCHAR,
    registry_erased_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS checkpoints (
    key VARCHAR PRIMARY KEY, shard INTEGER, prefix VARCHAR, stage INTEGER, parent_key VARCHAR,
    slice INTEGER, slice_version VARCHAR, prefix_versions VARCHAR, sha256 VARCHAR, n_train INTEGER,
    grad_example_steps BIGINT, steps INTEGER, val_acc DOUBLE, seconds DOUBLE, started_at TIMESTAMP,
    created_at TIMESTAMP, purged_at TIMESTAMP, purge_reason VARCHAR);
CREATE SEQUENCE IF NOT EXISTS plan_ids START 1;
CREATE TABLE IF NOT EXISTS plans (
    plan_id INTEGER PRIMARY KEY, created_at TIMESTAMP, plan VARCHAR, n_live INTEGER, n_deletions INTEGER,
    published_at TIMESTAMP, model_version INTEGER);
CREATE TABLE IF NOT EXISTS data_files (path VARCHAR PRIMARY KEY, sha256 VARCHAR, written_at TIMESTAMP);
"""
TABLES = ("meta", "examples", "slice_versions", "slice_members", "deletions", "checkpoints", "plans", "data_files")
TABLES_V2 = TABLES[:-1]
CHECKPOINT_COLUMNS = ("key", "shard", "prefix", "stage", "parent_key", "slice", "slice_version", "prefix_versions", "sha256",
                      "n_train", "grad_example_steps", "steps", "val_acc", "seconds", "started_at")


class LedgerError(RuntimeError):
    """The ledger cannot be used: locked too long, not permitted, from an older version."""


class LedgerDamagedError(LedgerError):
    """The ledger file cannot be read back; nothing is written to it."""


class UnknownExampleError(KeyError):
    """Ids that the ledger never held; nothing was written."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class HonourReceipt:
    new: tuple[str, ...]  # ids newly deleted now
    already: tuple[str, ...]  # deleted by an earlier request (idempotent)
    dirty: tuple[tuple[int, int], ...]  # (shard, slice) whose data version changed
    plan_id: int | None  # the plan that honours them (None: nothing served yet and nothing new)
    record: dict | None


def _latest(con: duckdb.DuckDBPyConnection) -> tuple[int, dict] | None:
    """(plan id, record) of the latest served plan, as `con` sees it."""
    rows = con.execute("SELECT plan_id, plan FROM plans ORDER BY plan_id DESC LIMIT 1").fetchall()
    return (int(rows[0][0]), json.loads(rows[0][1])) if rows else None


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class _ProcessLock:
    """An flock on `<ledger>.lock`, re-entrant within a process (threads queue on an RLock)."""

    _locks: dict[str, "_ProcessLock"] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path):
        self.path = path
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    @classmethod
    def for_path(cls, path: Path) -> "_ProcessLock":
        key = str(path.resolve())
        with cls._guard:
            if key not in cls._locks:
                cls._locks[key] = cls(path)
            return cls._locks[key]

    @contextmanager
    def hold(self, wait_s: float) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0:
                self._acquire(wait_s)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.fd is not None:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    os.close(self.fd)
                    self.fd = None

    def _acquire(self, wait_s: float) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise LedgerError(f"ledger lock {self.path}: permission denied") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LedgerError(f"ledger {self.path.with_suffix('')} stayed locked by another process for {wait_s:.0f}s") from None
                time.sleep(0.02)


class Ledger:
    def __init__(self, path: str | Path, keyring: Keyring | None = None, wait_s: float = 120.0):
        self.path = Path(path)
        self.wait_s = wait_s
        self._keyring = keyring
        self._local = threading.local()  # a session's connection belongs to the thread that opened it
        self._checked = False
        self.schema_version: int | None = None  # read by `check`

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = Keyring.load(self.path.parent)
        return self._keyring

    def tombstone(self, example_id: str) -> str:
        return self.keyring.tombstone(example_id)

    # --- connections ------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's process lock (no connection): other processes wait meanwhile."""
        if not self.path.parent.is_dir():
            raise LedgerError(f"no state folder at {self.path.parent}")
        with _ProcessLock.for_path(self.lock_path).hold(self.wait_s):
            yield

    @property
    def _session(self) -> duckdb.DuckDBPyConnection | None:
        return getattr(self._local, "con", None)

    @contextmanager
    def session(self) -> Iterator["Ledger"]:
        """One connection for a burst of calls in this thread (opening one costs ~10 ms); other processes, and other
        threads of this one, wait meanwhile (the process lock is held)."""
        if self._session is not None:
            yield self
            return
        with self.connect() as con:
            self._local.con = con
            try:
                yield self
            finally:
                self._local.con = None

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection under the process lock (read-write: DuckDB refuses a read-only and a read-write
        connection to one file in one process, so readers use the same kind)."""
        if self._session is not None:
            yield self._session
            return
        if not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}: run `s3t train` or `s3t demo` first")
        with self.locked():
            if not self._checked:
                self.check()
            con = self._open(read_only=False)
            try:
                yield con
            finally:
                con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "Permission denied" in msg:
                raise LedgerError(f"ledger {self.path}: permission denied") from None
            if "lock" in msg.lower():
                raise LedgerError(f"ledger {self.path} is open in another program (not s3t): {msg}") from None
            raise LedgerDamagedError(f"ledger {self.path} is damaged ({msg.splitlines()[0]}); restore it from a backup — nothing was written") from None
        except duckdb.Error as exc:
            raise LedgerDamagedError(f"ledger {self.path} is damaged ({str(exc).splitlines()[0]}); restore it from a backup — nothing was written") from None

    def check(self) -> None:
        """Read every table back with a read-only connection; a damaged or foreign file raises before any write."""
        with self.locked():
            con = self._open(read_only=True)
            try:
                names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                version = SCHEMA_VERSION
                if "meta" in names:
                    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
                    version = json.loads(row[0][0]) if row else 1
                    if version != SCHEMA_VERSION and version not in MIGRATABLE:
                        raise LedgerError(f"ledger {self.path} has schema {version}; this s3t-ops reads schema {SCHEMA_VERSION}: "
                                          "re-create the state with `s3t train --state NEW_FOLDER`")
                tables = TABLES if version == SCHEMA_VERSION else TABLES_V2
                missing = [t for t in tables if t not in names]
                if missing:
                    raise LedgerDamagedError(f"ledger {self.path} is damaged (tables {', '.join(missing)} are missing); "
                                             "restore it from a backup — nothing was written")
                self.schema_version = version
                for t in tables:
                    con.execute(f"SELECT * FROM {t}").fetchall()  # every block is read (and checksummed) once
            except duckdb.Error as exc:
                raise LedgerDamagedError(f"ledger {self.path} is damaged ({str(exc).splitlines()[0]}); restore it from a backup — "
                                         "nothing was written") from None
            finally:
                con.close()
        self._checked = True

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

    def create(self, keyring: Keyring) -> None:
        """A new ledger file with the schema (the folder is new: nothing to check), keyed with the state's new key."""
        self._keyring = keyring
        self.schema_version = SCHEMA_VERSION
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.locked():
            con = self._open(read_only=False)
            try:
                con.execute(SCHEMA)
                con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [json.dumps(SCHEMA_VERSION)])
            finally:
                con.close()
        self._checked = True

    def exists(self) -> bool:
        return self.path.exists()

    # --- meta -------------------------------------------------------------------------------
    def set_meta(self, key: str, value: object) -> None:
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def get_meta(self, key: str, default: object = None) -> object:
        with self.connect() as con:
            rows = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
        return json.loads(rows[0][0]) if rows else default

    # --- examples and slices ----------------------------------------------------------------
    def add_examples(self, frame: pd.DataFrame) -> None:
        """Ingest once: examples with id, text, label, split, shard, slice (shard/slice null off train)."""
        data = frame[["id", "text", "label", "split", "shard", "slice"]].copy()
        with self.transaction() as con:
            n = con.execute("SELECT count(*) FROM examples").fetchall()[0][0]
            if n:
                raise LedgerError(f"ledger {self.path} already holds {n} examples; use a new state folder")
            con.register("incoming", data)
            con.execute("INSERT INTO examples SELECT id, text, label, split, shard, slice FROM incoming")
            con.unregister("incoming")
            train = data[data["split"] == "train"]
            for (s, j), members in train.groupby(["shard", "slice"]):
                self._record_version(con, int(s), int(j), members["id"].tolist())

    def _record_version(self, con: duckdb.DuckDBPyConnection, shard: int, slc: int, ids: Sequence[str]) -> str:
        version = self.keyring.slice_version(ids)
        con.execute("UPDATE slice_versions SET is_current = false WHERE shard=? AND slice=? AND is_current", [shard, slc])
        exists = con.execute("SELECT 1 FROM slice_versions WHERE shard=? AND slice=? AND version=?", [shard, slc, version]).fetchall()
        if exists:
            con.execute("UPDATE slice_versions SET is_current = true WHERE shard=? AND slice=? AND version=?", [shard, slc, version])
            return version
        con.execute("INSERT INTO slice_versions VALUES (?, ?, ?, ?, ?, true)", [version, shard, slc, len(ids), now()])
        rows = pd.DataFrame({"version": version, "shard": shard, "slice": slc, "member": self.keyring.tombstones(ids)})
        con.register("members", rows)
        con.execute("INSERT INTO slice_members SELECT version, shard, slice, member FROM members")
        con.unregister("members")
        return version

    def examples(self, split: str | None = None) -> pd.DataFrame:
        """Live examples (deleted ones are physically gone)."""
        with self.connect() as con:
            if split is None:
                return con.execute("SELECT * FROM examples ORDER BY id").df()
            return con.execute("SELECT * FROM examples WHERE split = ? ORDER BY id", [split]).df()

    def members(self, shard: int, slc: int) -> pd.DataFrame:
        """Live members (id, label) of one training slice, ordered by id."""
        with self.connect() as con:
            return con.execute("SELECT id, label FROM examples WHERE split='train' AND shard=? AND slice=? ORDER BY id",
                               [shard, slc]).df()

    def find(self, texts: Sequence[str]) -> dict[str, str]:
        """Exact text -> id of the live examples holding it."""
        with self.connect() as con:
            con.register("wanted", pd.DataFrame({"text": list(texts)}))
            rows = con.execute("SELECT e.text, e.id FROM examples e JOIN wanted w USING (text)").fetchall()
            con.unregister("wanted")
        return {t: i for t, i in rows}

    def slice_versions(self, shards: int, slices: int, con: duckdb.DuckDBPyConnection | None = None) -> dict[tuple[int, int], str]:
        """Current data version of every (shard, slice); a cell that never held an example has the empty version."""
        def read(c: duckdb.DuckDBPyConnection) -> dict[tuple[int, int], str]:
            rows = c.execute("SELECT shard, slice, version FROM slice_versions WHERE is_current").fetchall()
            return {(int(s), int(j)): v for s, j, v in rows}

        if con is not None:
            got = read(con)
        else:
            with self.connect() as c:
                got = read(c)
        empty = self.keyring.slice_version([])
        return {(s, j): got.get((s, j), empty) for s in range(shards) for j in range(slices)}

    def slice_counts(self) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(
                "SELECT shard, slice, count(*) AS n_live FROM examples WHERE split='train' GROUP BY ALL ORDER BY ALL"
            ).df()

    # --- deletions: honour in one transaction ---------------------------------------------
    def honour(self, ids: Iterable[str], plan_for: Callable[[duckdb.DuckDBPyConnection], tuple[dict, int]],
               request: str | None = None) -> HonourReceipt:
        """Delete examples and serve a plan that honours them, in ONE transaction (idempotent).

        `plan_for(con)` computes the new plan record and its live-shard count from inside the
        transaction (it sees the new slice versions). Unknown ids raise before anything is written.
        `request` names where the request came from (e.g. a Dagster run id), so follow-up work can link to it.
        """
        wanted = list(dict.fromkeys(str(i).strip() for i in ids))
        if not wanted or any(not i for i in wanted):
            raise ValueError("no example ids given" if not wanted else "an example id is blank")
        tombs = {i: self.tombstone(i) for i in wanted}
        with self.transaction() as con:
            con.register("wanted", pd.DataFrame({"id": wanted, "tombstone": [tombs[i] for i in wanted]}))
            live = con.execute("SELECT e.id, e.split, e.shard, e.slice, w.tombstone FROM examples e JOIN wanted w USING (id) ORDER BY e.id").df()
            done = con.execute("SELECT w.id FROM deletions d JOIN wanted w USING (tombstone) ORDER BY w.id").df()["id"].tolist()
            unknown = sorted(set(wanted) - set(live["id"]) - set(done))
            if unknown:
                shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise UnknownExampleError(f"{len(unknown)} unknown example id(s): {shown}; nothing was deleted")
            if live.empty:  # every id already forgotten: the latest plan honours them
                con.unregister("wanted")
                pid, record = _latest(con) or (None, None)
                return HonourReceipt((), tuple(done), (), pid, record)
            t = now()
            con.execute("""INSERT INTO deletions SELECT w.tombstone, e.split, e.shard, e.slice, ?, NULL, NULL, NULL, NULL, ?, NULL
                           FROM examples e JOIN wanted w USING (id)""", [t, request])
            con.execute("DELETE FROM examples WHERE id IN (SELECT id FROM wanted)")
            con.unregister("wanted")
            train = live[live["split"] == "train"]
            dirty = sorted({(int(s), int(j)) for s, j in zip(train["shard"], train["slice"])})
            for s, j in dirty:
                remaining = con.execute("SELECT id FROM examples WHERE shard=? AND slice=? AND split='train' ORDER BY id", [s, j]).fetchall()
                self._record_version(con, s, j, [r[0] for r in remaining])
            record, n_live = plan_for(con)
            pid = self._insert_plan(con, record, n_live)
            crash_point("before_deletion_commit")
        crash_point("before_plan_pointer")
        self._point(pid, record)  # before this returns: whoever reads the pointer next serves the new plan
        crash_point("after_deletion_commit")
        return HonourReceipt(tuple(live["id"]), tuple(done), tuple(dirty), pid, record)

    def _insert_plan(self, con: duckdb.DuckDBPyConnection, record: dict, n_live: int) -> int:
        n_del = con.execute("SELECT count(*) FROM deletions").fetchall()[0][0]
        pid = int(con.execute("INSERT INTO plans VALUES (nextval('plan_ids'), ?, ?, ?, ?, NULL, NULL) RETURNING plan_id",
                              [now(), json.dumps(record, sort_keys=True), n_live, n_del]).fetchall()[0][0])
        con.execute("UPDATE deletions SET honoured_at = ?, honoured_by_plan = ? WHERE honoured_at IS NULL", [now(), pid])
        return pid

    def record_plan(self, record: dict, n_live: int) -> int:
        """A new served plan; it honours every deletion not yet honoured (one transaction)."""
        with self.transaction() as con:
            pid = self._insert_plan(con, record, n_live)
        self._point(pid, record)
        return pid

    def serve_plan(self, plan_for: Callable[[duckdb.DuckDBPyConnection], tuple[dict, int]]) -> tuple[int, dict]:
        """The plan `plan_for(con)` computes, recorded as the served one unless the latest plan already is it and every
        deletion is honoured (one transaction). Returns (plan id, record)."""
        with self.transaction() as con:
            record, n_live = plan_for(con)
            latest = _latest(con)
            unhonoured = con.execute("SELECT count(*) FROM deletions WHERE honoured_at IS NULL").fetchall()[0][0]
            if latest and latest[1] == json.loads(json.dumps(record)) and not unhonoured:
                return latest[0], record
            pid = self._insert_plan(con, record, n_live)
        self._point(pid, record)
        return pid, record

    # --- the plan pointer: what a server reads per request instead of the ledger -------------------
    @property
    def pointer_path(self) -> Path:
        return self.path.with_name(POINTER)

    def _point(self, plan_id: int, record: dict) -> None:
        """Replace the pointer to the served plan (atomically: a reader sees the old or the new one). Written after
        every transaction that records a plan and before it returns, so a server that checks the pointer's file
        stamp per request answers every request that starts after a forget returned with a plan that honours it,
        without taking the ledger's lock. A crash before the write leaves a pointer behind the ledger, which the next
        opening's repair puts right (`sync_pointer`)."""
        write_json(self.pointer_path, {"plan_id": int(plan_id), "record": record})

    def read_pointer(self) -> tuple[int, dict] | None:
        try:
            data = json.loads(self.pointer_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return int(data["plan_id"]), data["record"]

    def sync_pointer(self) -> bool:
        """Point at the latest plan if the pointer does not (a crash between a commit and the pointer); True if fixed."""
        with self.locked():
            latest = self.latest_plan()
            if latest is None or self.read_pointer() == latest:
                return False
            self._point(*latest)
            return True

    def deletions(self) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute("SELECT * FROM deletions ORDER BY requested_at, tombstone").df()

    def deleted(self) -> set[str]:
        """Tombstones of every deleted example."""
        with self.connect() as con:
            return {r[0] for r in con.execute("SELECT tombstone FROM deletions").fetchall()}

    def is_deleted(self, example_id: str) -> bool:
        return self.tombstone(example_id) in self.deleted()

    def unhonoured(self) -> int:
        with self.connect() as con:
            return int(con.execute("SELECT count(*) FROM deletions WHERE honoured_at IS NULL").fetchall()[0][0])

    def pending_erasure(self, where: str = "local") -> set[str]:
        """Tombstones not erased yet from the state's own files (`local`) or from the registry (`registry`)."""
        column = {"local": "erased_at", "registry": "registry_erased_at"}[where]
        with self.connect() as con:
            return {r[0] for r in con.execute(f"SELECT tombstone FROM deletions WHERE {column} IS NULL").fetchall()}

    def mark_erased(self, tombstones: Iterable[str], where: str = "local") -> None:
        column = {"local": "erased_at", "registry": "registry_erased_at"}[where]
        tombs = list(tombstones)
        if not tombs:
            return
        with self.transaction() as con:
            con.register("erased", pd.DataFrame({"tombstone": tombs}))
            con.execute(f"UPDATE deletions SET {column} = ? WHERE {column} IS NULL AND tombstone IN (SELECT tombstone FROM erased)", [now()])
            con.unregister("erased")

    def mark_retrained(self, still_stale: Callable[[duckdb.DuckDBPyConnection], bool]) -> bool:
        """Stamp deletions retrained, only if `still_stale(con)` says no stage awaits retraining (one transaction)."""
        with self.transaction() as con:
            if still_stale(con):
                return False
            crash_point("before_retrained_mark")
            con.execute("UPDATE deletions SET retrained_at = ? WHERE retrained_at IS NULL", [now()])
            return True

    # --- checkpoints ------------------------------------------------------------------------
    def record_checkpoint(self, row: dict, prefix_slices: Sequence[tuple[int, int, str]], place_file: Callable[[], None]) -> bool:
        """Record a trained stage only if its data is still current, in one transaction.

        `prefix_slices` = (shard, slice, version) the stage was trained on; if any slice changed (an
        example was deleted meanwhile) or the parent checkpoint was purged, nothing is recorded and
        False is returned: the caller discards the weights. `place_file()` renames the file into
        place inside the transaction, so a file under its final name always has a row (a crash in
        between leaves an orphan that the next open removes).
        """
        with self.transaction() as con:
            current = {(int(s), int(j)): v for s, j, v in
                       con.execute("SELECT shard, slice, version FROM slice_versions WHERE is_current").fetchall()}
            if any(current.get((s, j)) != v for s, j, v in prefix_slices):
                return False
            if row.get("parent_key"):
                alive = con.execute("SELECT 1 FROM checkpoints WHERE key = ? AND purged_at IS NULL", [row["parent_key"]]).fetchall()
                if not alive:
                    return False
            place_file()
            crash_point("after_checkpoint_file")
            cols = list(CHECKPOINT_COLUMNS)
            con.execute(
                f"INSERT OR REPLACE INTO checkpoints ({', '.join(cols)}, created_at, purged_at, purge_reason) "
                f"VALUES ({', '.join('?' * len(cols))}, ?, NULL, NULL)",
                [row.get(c) for c in cols] + [now()],
            )
            crash_point("before_checkpoint_commit")
        crash_point("after_checkpoint_commit")
        return True

    def checkpoints(self, live_only: bool = True, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
        where = "WHERE purged_at IS NULL" if live_only else ""
        sql = f"SELECT * FROM checkpoints {where} ORDER BY shard, prefix"
        if con is not None:
            return con.execute(sql).df()
        with self.connect() as c:
            return c.execute(sql).df()

    def mark_purged(self, keys: Sequence[str], reason: str) -> None:
        if not keys:
            return
        with self.transaction() as con:
            con.register("purged", pd.DataFrame({"key": list(keys)}))
            con.execute("UPDATE checkpoints SET purged_at = ?, purge_reason = ? WHERE purged_at IS NULL AND key IN (SELECT key FROM purged)",
                        [now(), reason])
            con.unregister("purged")

    def lineage(self, key: str) -> set[str]:
        """Tombstones of every example a checkpoint was trained on: the members of the slice versions up its parent chain."""
        with self.connect() as con:
            rows = con.execute(
                """
                WITH RECURSIVE chain(key, parent_key, shard, slice, slice_version) AS (
                    SELECT key, parent_key, shard, slice, slice_version FROM checkpoints WHERE key = ?
                    UNION ALL
                    SELECT c.key, c.parent_key, c.shard, c.slice, c.slice_version FROM checkpoints c JOIN chain ON c.key = chain.parent_key
                )
                SELECT DISTINCT m.member FROM chain JOIN slice_members m
                  ON m.version = chain.slice_version AND m.shard = chain.shard AND m.slice = chain.slice
                """,
                [key],
            ).fetchall()
        return {r[0] for r in rows}

    # --- plans ------------------------------------------------------------------------------
    def latest_plan(self) -> tuple[int, dict] | None:
        with self.connect() as con:
            return _latest(con)

    def plan(self, plan_id: int) -> dict | None:
        with self.connect() as con:
            rows = con.execute("SELECT plan FROM plans WHERE plan_id = ?", [int(plan_id)]).fetchall()
        return json.loads(rows[0][0]) if rows else None

    def publication(self, plan_id: int) -> tuple[datetime | None, int | None]:
        with self.connect() as con:
            rows = con.execute("SELECT published_at, model_version FROM plans WHERE plan_id = ?", [int(plan_id)]).fetchall()
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def mark_published(self, plan_id: int, model_version: int | None) -> None:
        with self.connect() as con:
            con.execute("UPDATE plans SET published_at = ?, model_version = ? WHERE plan_id = ?", [now(), model_version, int(plan_id)])

    # --- data files (trunk cache, slice Parquet): what each should hold -------------------------
    def record_file(self, path: str, sha256: str | None) -> None:
        """The sha256 a data file was written with (None: forget it, the file was removed)."""
        with self.connect() as con:
            if sha256 is None:
                con.execute("DELETE FROM data_files WHERE path = ?", [path])
            else:
                con.execute("INSERT OR REPLACE INTO data_files VALUES (?, ?, ?)", [path, sha256, now()])

    def file_sha(self, path: str) -> str | None:
        with self.connect() as con:
            rows = con.execute("SELECT sha256 FROM data_files WHERE path = ?", [path]).fetchall()
        return rows[0][0] if rows else None

    # --- migration from schema 2 ------------------------------------------------------------
    def migrate_v2(self, root_key_of: Callable[[int], str], stage_key: Callable[[str, int, str, int], str],
                   file_hashes: Callable[[], dict[str, str]]) -> dict[str, str]:
        """Schema 2 -> 3 in ONE transaction: slice versions keyed (the current ones recomputed from the live ids, older
        ones re-keyed), every checkpoint key re-derived from them (`root_key_of(shard)`, `stage_key(...)`: the
        engine's content addressing), plans rewritten with the new keys, the `data_files` table filled with the
        hashes of the data files as they are (`file_hashes()`), and `registry_erased_at` added (set where the
        deletion was fully erased). Returns {old key: new key}; it is also kept in meta `pending_renames` until the
        caller has renamed the checkpoint files (`done_renames`), so a crash in between is finished on the next open."""
        with self.transaction() as con:
            version = json.loads(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0])
            if version != 2:
                return {}
            con.execute("ALTER TABLE deletions ADD COLUMN registry_erased_at TIMESTAMP")
            con.execute("UPDATE deletions SET registry_erased_at = erased_at")
            con.execute("CREATE TABLE IF NOT EXISTS data_files (path VARCHAR PRIMARY KEY, sha256 VARCHAR, written_at TIMESTAMP)")
            vmap: dict[tuple[int, int, str], str] = {}
            for v, s, j, current in con.execute("SELECT version, shard, slice, is_current FROM slice_versions").fetchall():
                if current:
                    ids = [r[0] for r in con.execute("SELECT id FROM examples WHERE split='train' AND shard=? AND slice=?",
                                                      [s, j]).fetchall()]
                    vmap[(int(s), int(j), v)] = self.keyring.slice_version(ids)
                else:
                    vmap[(int(s), int(j), v)] = self.keyring.rekey(v, "slice-version")
            # rows are replaced (delete, then insert the mapped rows): DuckDB checks keys eagerly on in-place updates
            sv = con.execute("SELECT * FROM slice_versions").df()
            sv["version"] = [vmap[(int(s), int(j), v)] for v, s, j in zip(sv["version"], sv["shard"], sv["slice"])]
            members = con.execute("SELECT * FROM slice_members").df()
            members["version"] = [vmap.get((int(s), int(j), v), self.keyring.rekey(v, "slice-version"))
                                   for v, s, j in zip(members["version"], members["shard"], members["slice"])]
            ck = con.execute("SELECT * FROM checkpoints ORDER BY stage").df().astype(object)
            ck = ck.where(ck.notna(), None)
            kmap: dict[str, str] = {}
            rows = []
            for r in ck.to_dict("records"):
                s, slc, stage = int(r["shard"]), int(r["slice"]), int(r["stage"])
                new_sv = vmap.get((s, slc, r["slice_version"]), self.keyring.rekey(r["slice_version"], "slice-version"))
                slices = [int(x) for x in str(r["prefix"]).split("-")]
                new_pvs = [vmap.get((s, j, v), self.keyring.rekey(v, "slice-version"))
                           for j, v in zip(slices, json.loads(r["prefix_versions"]))]
                parent = r["parent_key"]
                parent_new = root_key_of(s) if parent is None else kmap.get(parent, self.keyring.rekey(parent, "checkpoint"))
                kmap[r["key"]] = stage_key(parent_new, slc, new_sv, stage)
                rows.append({**r, "key": kmap[r["key"]], "parent_key": None if parent is None else parent_new,
                             "slice_version": new_sv, "prefix_versions": json.dumps(new_pvs)})
            for table, frame in (("slice_versions", sv), ("slice_members", members),
                                 ("checkpoints", pd.DataFrame(rows, columns=list(ck.columns)))):
                con.execute(f"DELETE FROM {table}")
                if len(frame):
                    con.register("migrated", frame)
                    con.execute(f"INSERT INTO {table} SELECT {', '.join(frame.columns)} FROM migrated")
                    con.unregister("migrated")
            for pid, plan in con.execute("SELECT plan_id, plan FROM plans").fetchall():
                record = json.loads(plan)
                record["checkpoints"] = {sh: [kmap.get(k, k) for k in keys] for sh, keys in record.get("checkpoints", {}).items()}
                con.execute("UPDATE plans SET plan = ? WHERE plan_id = ?", [json.dumps(record, sort_keys=True), pid])
            for path, sha in file_hashes().items():
                con.execute("INSERT OR REPLACE INTO data_files VALUES (?, ?, ?)", [path, sha, now()])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('pending_renames', ?)", [json.dumps(kmap)])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('registry_rekey', ?)", [json.dumps(kmap)])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [json.dumps(SCHEMA_VERSION)])
        self.schema_version = SCHEMA_VERSION
        return kmap

    # --- erasure of the file itself ---------------------------------------------------------
    def compact(self) -> None:
        """Rewrite the ledger into a fresh file and swap it in, holding the process lock.

        DuckDB neither rewrites a row group for a few deleted rows nor zeroes freed blocks, so a deleted
        example's text stays readable in the file until the database is copied. The copy is written
        beside the file, checkpointed, then renamed over it after every connection is closed; a crash
        leaves either the old file (and a stale copy, removed here next time) or the new one.
        """
        tmp = self.path.with_name(self.path.name + ".compact")
        with self.locked():
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
            with self.connect() as con:
                con.execute("CHECKPOINT")
                name = con.execute("SELECT current_database()").fetchall()[0][0]
                con.execute(f"ATTACH '{str(tmp).replace(chr(39), chr(39) * 2)}' AS s3t_compact")
                try:
                    con.execute(f'COPY FROM DATABASE "{name}" TO s3t_compact')
                    con.execute("CHECKPOINT s3t_compact")
                    con.execute("DETACH s3t_compact")
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            crash_point("during_compaction")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)  # the old file's, already checkpointed

    def remove_compaction_leftovers(self) -> list[Path]:
        with self.locked():
            out = []
            for p in (self.path.with_name(self.path.name + ".compact"), self.path.with_name(self.path.name + ".compact.wal")):
                if p.exists():
                    p.unlink()
                    out.append(p)
            return out

"""Named crash points, so crash tests kill the process at an exact step instead of relying on timing.

`S3T_CRASH_AT=<point>` makes the process SIGKILL itself the first time it reaches `crash_point(point)`
(`S3T_CRASH_AT=<point>:<n>`: the n-th time in the whole command, its pool workers included: arrivals are counted
in a file named after the command's pid, so which worker trains which stage does not decide whether it fires). `S3T_PAUSE_AT=<point>:<file>` makes it wait at that point
until `<file>` exists (it touches `<file>.reached` on arrival), so a test can run a second command
in between, deterministically. Unset, both cost one dictionary lookup.

Every point is listed in POINTS with the step it interrupts; the crash tests iterate over them.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = {
    # ingest (a new state folder)
    "during_ingest": "ledger written in the temporary folder, before it is renamed into place",
    # forget: honour, publish, erase
    "before_deletion_commit": "deletion rows, new slice versions and the plan written, transaction not committed",
    "before_plan_pointer": "honoured in the ledger, before the plan pointer servers read names the new plan",
    "after_deletion_commit": "honoured in the ledger; registry not told, nothing erased",
    "after_model_logged": "ensemble run and model logged in MLflow, no registry version yet",
    "after_version_registered": "registry version created, before its tags and the champion alias",
    "after_alias_moved": "champion moved, before the ledger records the plan as published",
    "during_trunk_erase": "one cached-trunk file rewritten without the deleted rows, others not yet",
    "during_slice_erase": "one slice Parquet file rewritten, others not yet",
    "during_registry_erase": "one tainted registry version deleted, its run not yet",
    "during_compaction": "ledger copy written beside the old file, before it replaces it",
    "before_erased_mark": "everything erased, before the ledger marks the deletions erased",
    "during_purge": "one stale checkpoint file deleted, its row not yet marked purged",
    # training
    "before_checkpoint_record": "a stage trained and written under a temporary name, before its ledger transaction",
    "after_checkpoint_file": "checkpoint file renamed into place, no ledger row yet",
    "before_checkpoint_commit": "checkpoint row about to be committed (validity checked in the same transaction)",
    "after_checkpoint_commit": "checkpoint recorded, before the next stage",
    "before_retrained_mark": "every stage trained, before deletions are marked retrained",
}

_machine: list[int] = []  # the pids a crash takes down with this one: a worker's parent (the whole command)


def as_worker_of(parent_pid: int) -> None:
    """Called in a pool worker: a crash point reached here kills the command that started the pool too.

    A crash point models the machine going down, not one worker dying (which the parent reports as an error),
    so a crash test sees the same thing whether the stage trained in a worker or in the command itself.
    """
    _machine[:] = [parent_pid]


def _counter(name: str) -> Path:
    """The file counting arrivals at `name` in this command: named after the command's pid and start time (so a
    later process that reuses the pid starts from zero); removed when the point fires."""
    import tempfile

    command = _machine[0] if _machine else os.getpid()
    try:
        started = Path(f"/proc/{command}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except OSError:
        started = "0"
    return Path(tempfile.gettempdir()) / f"s3t-crash-{command}-{started}-{name}"


def _arrivals(name: str) -> int:
    """This arrival's number at `name` in the command (the process and its pool workers together)."""
    import fcntl

    with open(_counter(name), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
    return n


def _parse(var: str) -> tuple[str, str] | None:
    value = os.environ.get(var)
    if not value:
        return None
    point, _, arg = value.partition(":")
    return point, arg


def crash_point(name: str) -> None:
    """SIGKILL here when S3T_CRASH_AT names this point (after its n-th arrival); pause when S3T_PAUSE_AT does."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    crash = _parse("S3T_CRASH_AT")
    if crash and crash[0] == name:
        if _arrivals(name) >= int(crash[1] or 1):
            _counter(name).unlink(missing_ok=True)
            for pid in _machine:
                os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
    pause = _parse("S3T_PAUSE_AT")
    if pause and pause[0] == name and pause[1]:
        release = Path(pause[1])
        Path(str(release) + ".reached").touch()
        deadline = time.monotonic() + float(os.environ.get("S3T_PAUSE_TIMEOUT", "120"))
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"paused at {name} but {release} never appeared")
            time.sleep(0.02)

"""Repair on open: finish or undo what a crash (or damage) left, before a command does anything else.

Every step is idempotent and driven by what is on disk and in the ledger, never by memory of the
crashed process:
- temporaries of dead writers (`*.tmp-<pid>`; local storage only: an object store has none) and a stale
  ledger copy from compaction are removed;
- checkpoint files (or objects) without a ledger row (a crash between file and row) are orphans: deleted;
- live rows whose file is missing or damaged (sha256 mismatch) are purged: the stage is missing and
  retrains; it is never served;
- checkpoints made stale by a deletion but not yet purged are purged;
- deletions not honoured by a plan (not possible with the atomic honour path, kept as a guard), and a
  served plan that names a purged checkpoint, get a new served plan;
- the latest plan is published if the registry has not heard of it (champion moved); asked to
  (`check_registry`), the champion's copy in the registry is verified against the plan's sha256 and
  re-published when damaged;
- deletions not yet erased are erased (see erasure.py): the state's files first, then the registry;
- a registry that cannot be reached never fails the command: the report says what waits for it
  (`registry_error`), and the next command retries.
The returned report lists what was done, one line per action (empty: nothing to repair).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from s3t_ops.engine import RepairReport, S3T


def repair(engine: "S3T", check_registry: bool = False) -> "RepairReport":
    """`check_registry`: also verify the registry's copy of the champion file by file (reads every file: `s3t status`
    and `s3t repair` ask for it; the other commands do not pay for it)."""
    from s3t_ops.engine import RepairReport
    from s3t_ops.erasure import erase_pending
    from s3t_ops.files import remove_temporaries

    report = RepairReport()
    say = report.actions.append
    for sub in ("checkpoints", "trunk", "slices", "memorization"):
        for p in engine.storage.remove_temporaries(sub):
            say(f"removed temporary file {p}")
    for p in remove_temporaries(engine.storage.scratch):
        say(f"removed staging folder {p}")
    for p in engine.ledger.remove_compaction_leftovers():
        say(f"removed unfinished ledger copy {p}")

    with engine.ledger.locked():  # no trainer can place a file or record a row meanwhile
        rows = engine.checkpoint_rows()
        on_disk = engine.store.keys_on_disk()
        for key in sorted(on_disk - set(rows)):
            engine.store.delete(key)
            say(f"deleted orphan checkpoint file {engine.store.location(key)} (no ledger row: a crash between file and row)")
        missing = [k for k in rows if not engine.store.exists(k)]
        damaged = [k for k in rows if engine.store.exists(k) and not engine.store.intact(k, rows[k]["sha256"])]
        for k in damaged:
            say(f"checkpoint file {engine.store.location(k)} is damaged (sha256 differs from the ledger's): removed; "
                f"stage {rows[k]['stage']} of shard {rows[k]['shard']} will retrain and is not served")
            engine.store.delete(k)
        for k in missing:
            say(f"checkpoint file {engine.store.location(k)} is missing: stage {rows[k]['stage']} of shard {rows[k]['shard']} will retrain")
        engine.ledger.mark_purged(missing, "file missing")
        engine.ledger.mark_purged(damaged, "file damaged")
        engine._forget_cache()

    if engine.ledger.pending_erasure() or missing or damaged:
        n = engine.purge_stale()
        if n:
            say(f"purged {n} stale checkpoint(s) trained on deleted examples")

    from s3t_ops.publish import PublishError

    latest = engine.served()
    live = engine.checkpoint_rows()
    broken = latest is not None and any(k not in live for keys in latest[1]["checkpoints"].values() for k in keys)
    try:
        if engine.ledger.unhonoured() or broken:
            pid, _ = engine.serve(publish=False)
            say(f"served plan {pid}" + (" (the previous one named a missing or damaged checkpoint)" if broken else
                                        " honouring deletions that no plan honoured yet"))
        latest = engine.served()
        if latest is not None and engine.ledger.publication(latest[0])[0] is None and engine.publisher.registers:
            version = engine.publish()
            say(f"published plan {latest[0]} to the registry (champion -> version {version})")
        rekey = engine.ledger.get_meta("registry_rekey")
        if rekey:  # a migrated ledger (keyed slice versions): the registry follows once
            engine.publisher.rekey(engine, rekey)
            engine.ledger.set_meta("registry_rekey", None)
            say(f"registry brought in line with the keyed slice versions ({len(rekey)} checkpoint key(s) re-derived)")
        if check_registry and latest is not None and engine.publisher.registers:
            damaged = engine.publisher.damaged_copy()
            if damaged:
                version = engine.publisher.republish(engine, latest[0], latest[1])
                engine.ledger.mark_published(latest[0], version)
                say(f"the registry's copy of plan {latest[0]} was damaged ({len(damaged)} file(s): {', '.join(damaged[:3])}): "
                    f"re-published as version {version}, the damaged version deleted")
    except PublishError as exc:
        report.registry_error = str(exc)
        say(f"registry not updated: {exc}")

    pending = engine.ledger.pending_erasure("local") | engine.ledger.pending_erasure("registry")
    if pending:
        er = erase_pending(engine)
        if er.pending:
            say(f"erased {er.pending} deleted example(s) from the state's files: {er.trunk_files} trunk file(s), "
                f"{er.slice_files} slice file(s), {len(er.memorization)} memorization artifact(s), ledger compacted")
        if er.registry:
            say(f"erased {len(er.registry)} registry item(s) holding deleted examples")
        if er.registry_error and not report.registry_error:
            report.registry_error = er.registry_error
            say(f"registry erasure not done: {er.registry_error}")
        elif not er.complete and not er.registry_error:
            say("registry erasure waits for the plan to be published")
    return report

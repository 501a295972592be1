"""Repair on open: finish or undo what a crash (or damage) left, before a command does anything else.

Every step is idempotent and driven by what is on disk and in the ledger, never by memory of the crashed process:
- temporaries of dead writers (`*.tmp-<pid>`; local storage only: an object store has none) and a stale ledger copy
  from compaction are removed;
- checkpoint files (or objects) without a ledger row (a crash between file and row) are orphans: deleted;
- live rows whose file is missing or damaged (sha256 mismatch) are purged: the stage is missing and retrains; it is
  never served;
- checkpoints made stale by a deletion but not yet purged are purged;
- deletions not honoured by a plan (not possible with the atomic honour path, kept as a guard), and a served plan that
  names a purged checkpoint, get a new served plan;
- the latest plan is published if the registry has not heard of it (champion moved); asked to (`check_registry`),
  the champion's copy in the registry is verified against the plan's sha256 and re-published when damaged;
- deletions not yet erased are erased (see erasure.py): the state's files first, then the registry;
- a registry that cannot be reached never fails the command: the report says what waits for it (`registry_error`),
  and the next command retries.
The returned report lists what was done, one line per action (empty: nothing to repair).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from s3t_ops.erasure import erase_pending
from s3t_ops.files import remove_temporaries
from s3t_ops.forgetting import purge_stale
from s3t_ops.publish import PublishError
from s3t_ops.serving import bundle, publish, serve
from s3t_ops.state import State


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)
    registry_error: str | None = None  # the registry could not be reached: what waits for it is retried next time

    def __bool__(self) -> bool:
        return bool(self.actions)


def repair(state: State, check_registry: bool = False) -> RepairReport:
    """`check_registry`: also verify the registry's copy of the champion file by file (reads every file: `s3t status`
    and `s3t repair` ask for it; the other commands do not pay for it)."""
    report = RepairReport()
    say = report.actions.append
    for sub in ("checkpoints", "trunk", "slices", "memorization"):
        for p in state.storage.remove_temporaries(sub):
            say(f"removed temporary file {p}")
    for p in remove_temporaries(state.storage.scratch):
        say(f"removed staging folder {p}")
    for p in state.ledger.remove_compaction_leftovers():
        say(f"removed unfinished ledger copy {p}")
    if state.ledger.sync_pointer():
        say("pointed servers at the latest plan (the pointer was behind the ledger: a crash after a commit)")

    missing, damaged = _check_checkpoints(state, say)
    if state.ledger.pending_erasure() or missing or damaged:
        n = purge_stale(state)
        if n:
            say(f"purged {n} stale checkpoint(s) trained on deleted examples")
    try:
        _registry(state, check_registry, say)
    except PublishError as exc:
        report.registry_error = str(exc)
        say(f"registry not updated: {exc}")

    if state.ledger.pending_erasure("local") | state.ledger.pending_erasure("registry"):
        er = erase_pending(state)
        if er.pending:
            say(f"erased {er.pending} deleted example(s) from the state's files: {er.trunk_files} trunk file(s), "
                f"{er.slice_files} slice file(s), {len(er.others)} memorization artifact(s), ledger compacted")
        if er.registry:
            say(f"erased {len(er.registry)} registry item(s) holding deleted examples")
        if er.registry_error and not report.registry_error:
            report.registry_error = er.registry_error
            say(f"registry erasure not done: {er.registry_error}")
        elif not er.complete and not er.registry_error:
            say("registry erasure waits for the plan to be published")
    return report


def _check_checkpoints(state: State, say) -> tuple[list[str], list[str]]:
    """Orphan files deleted; rows whose file is missing or damaged purged (the stage retrains, it is never served)."""
    with state.ledger.locked():  # no trainer can place a file or record a row meanwhile
        rows = state.checkpoint_rows()
        for key in sorted(state.checkpoints.keys_on_disk() - set(rows)):
            state.checkpoints.delete(key)
            say(f"deleted orphan checkpoint file {state.checkpoints.location(key)} (no ledger row: a crash between file and row)")
        missing = [k for k in rows if not state.checkpoints.exists(k)]
        damaged = [k for k in rows if state.checkpoints.exists(k) and not state.checkpoints.intact(k, rows[k]["sha256"])]
        for k in damaged:
            say(f"checkpoint file {state.checkpoints.location(k)} is damaged (sha256 differs from the ledger's): removed; "
                f"stage {rows[k]['stage']} of shard {rows[k]['shard']} will retrain and is not served")
            state.checkpoints.delete(k)
        for k in missing:
            say(f"checkpoint file {state.checkpoints.location(k)} is missing: stage {rows[k]['stage']} of shard {rows[k]['shard']} will retrain")
        state.ledger.mark_purged(missing, "file missing")
        state.ledger.mark_purged(damaged, "file damaged")
        state.forget_rows()
    return missing, damaged


def _registry(state: State, check_registry: bool, say) -> None:
    """A plan for every deletion, published; a migrated ledger's registry re-keyed; a damaged champion copy replaced."""
    latest = state.served()
    live = state.checkpoint_rows()
    broken = latest is not None and any(k not in live for keys in latest[1]["checkpoints"].values() for k in keys)
    if state.ledger.unhonoured() or broken:
        pid, _ = serve(state, publish_it=False)
        say(f"served plan {pid}" + (" (the previous one named a missing or damaged checkpoint)" if broken else
                                    " honouring deletions that no plan honoured yet"))
    latest = state.served()
    if latest is not None and state.ledger.publication(latest[0])[0] is None and state.publisher.registers:
        version = publish(state)
        say(f"published plan {latest[0]} to the registry (champion -> version {version})")
    rekey = state.ledger.get_meta("registry_rekey")
    if rekey:  # a migrated ledger (keyed slice versions): the registry follows once
        if state.publisher.registers:
            serve(state, publish_it=False)  # the plan as recorded today (with its files' sha256)
            pid, record = state.served()
            state.ledger.mark_published(pid, state.publisher.republish(pid, record, bundle(state)))
            state.publisher.rekey(rekey, state.ledger.checkpoints(live_only=False).to_dict("records"))
        state.ledger.set_meta("registry_rekey", None)
        say(f"registry brought in line with the keyed slice versions ({len(rekey)} checkpoint key(s) re-derived)")
    latest = state.served()
    if check_registry and latest is not None and state.publisher.registers:
        damaged = state.publisher.damaged_copy()
        if damaged:
            version = state.publisher.republish(latest[0], latest[1], bundle(state))
            state.ledger.mark_published(latest[0], version)
            say(f"the registry's copy of plan {latest[0]} was damaged ({len(damaged)} file(s): {', '.join(damaged[:3])}): "
                f"re-published as version {version}, the damaged version deleted")

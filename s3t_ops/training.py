"""Training: which stages exist under the current data (content-addressed specs), which are missing, and training
them, one stage (a Dagster partition) or every missing stage a retraining policy picks (`s3t train`), on every core.

A stage's key hashes its parent's key with the slice it adds and that slice's (keyed) data version, so an unchanged
prefix keeps its key and is never retrained, and a deletion changes the key of every stage that saw the example.
Whichever door trains, the last stage that was stale stamps the deletions `retrained_at` (one transaction that
first checks nothing is still stale).

Every core: the (shard, sequence) chains are independent, and so is every stage of one depth across chains (stage k
needs only its parent, stage k-1 of the same chain). With `workers` > 1 the stages a run needs are trained in a pool
of processes, each as soon as its parent is done (no barrier between depths); the processes each open the state and
load the backbone once; each records its stage exactly as one process does (the ledger's transaction is the only place
that commits). Every process trains with one intra-op thread, the pool's workers and a single process alike, so the
checkpoints are the same bytes whatever the number of workers. The trunk cache is built the same way, a file per
task. On a GPU the work stays in one process.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from s3t_ops.checkpoints import IntegrityError, root_key, stage_key, stage_seed
from s3t_ops.datafiles import slice_file, trunk_file
from s3t_ops.faults import as_worker_of, crash_point
from s3t_ops.ledger import now
from s3t_ops.policy import select_chains, served_depths
from s3t_ops.state import StaleStage, State, StateError

Versions = dict[tuple[int, int], str]
Rows = dict[str, dict]


@dataclass(frozen=True)
class StageSpec:
    """One stage under the current data: stage k of sequence q of shard s, and its content key."""

    shard: int
    seq: int
    prefix: tuple[int, ...]
    key: str
    parent_key: str | None
    prefix_versions: tuple[str, ...]  # data version of each slice of the prefix
    seed: int

    @property
    def stage(self) -> int:
        return len(self.prefix)

    @property
    def slice(self) -> int:
        return self.prefix[-1]

    @property
    def slice_version(self) -> str:
        return self.prefix_versions[-1]


@dataclass
class TrainReport:
    trained: list[StageSpec] = field(default_factory=list)
    reused: int = 0
    discarded: int = 0  # trained on data deleted meanwhile: never recorded
    skipped: int = 0  # found stale before training (a deletion came in): recomputed
    deferred: int = 0  # stale (shard, sequence) chains the retraining policy left for a later run
    grad_example_steps: int = 0
    seconds: float = 0.0


# --- what should exist ---------------------------------------------------------------------------
def stage_specs(state: State, versions: Versions | None = None) -> list[StageSpec]:
    """Every (shard, sequence, stage) under the given (default: current) slice versions, stage by stage."""
    cfg = state.cfg
    versions = versions or state.ledger.slice_versions(cfg.shards, cfg.slices)
    n_labels = len(state.label_names)
    specs = []
    for s in range(cfg.shards):
        root = root_key(cfg.training_fingerprint(), state.backbone_fingerprint(), s, n_labels)
        for q, perm in enumerate(state.sequences):
            parent = root
            for k in range(1, cfg.slices + 1):
                prefix = tuple(perm[:k])
                pv = tuple(versions[(s, j)] for j in prefix)
                key = stage_key(parent, prefix[-1], pv[-1], k)
                specs.append(StageSpec(s, q, prefix, key, None if k == 1 else parent, pv, stage_seed(cfg.seed, s, prefix)))
                parent = key
    return sorted(specs, key=lambda x: (x.stage, x.shard, x.seq))


def missing_stages(state: State, versions: Versions | None = None, rows: Rows | None = None) -> list[StageSpec]:
    """Stages without an intact checkpoint under the current data (deduplicated: shared prefixes train once)."""
    rows = state.checkpoint_rows() if rows is None else rows
    seen, out = set(), []
    for spec in stage_specs(state, versions):
        if spec.key not in seen and not state.intact(spec.key, rows):
            out.append(spec)
        seen.add(spec.key)
    return out


def stale_chains(state: State, versions: Versions | None = None, rows: Rows | None = None) -> dict[tuple[int, int], list[StageSpec]]:
    """(shard, sequence) -> its stages without an intact checkpoint, stage by stage (a stage shared by two
    sequences' prefixes is listed in both)."""
    rows = state.checkpoint_rows() if rows is None else rows
    out: dict[tuple[int, int], list[StageSpec]] = {}
    for spec in stage_specs(state, versions):
        if not state.intact(spec.key, rows):
            out.setdefault((spec.shard, spec.seq), []).append(spec)
    return out


def chain_costs(state: State, chains: dict[tuple[int, int], list[StageSpec]]) -> dict[tuple[int, int], int]:
    """Example-steps to retrain each chain: live examples of every stage's prefix times the epochs."""
    counts = state.ledger.slice_counts().set_index(["shard", "slice"])["n_live"].to_dict()
    return {c: sum(sum(int(counts.get((s.shard, j), 0)) for j in s.prefix) * state.cfg.epochs for s in specs)
            for c, specs in chains.items()}


def chains_to_retrain(state: State, policy: str = "all", budget: int | None = None) -> tuple[list[tuple[int, int, int]], int]:
    """The stale (shard, sequence) chains the retraining `policy` picks now (s3t_ops/policy.py), within `budget`
    example-steps if given, in the policy's order, each with the first stage it must retrain; and how many stale
    chains it leaves for later. `s3t train` and the Dagster nightly schedule pick through this one call."""
    chains = stale_chains(state)
    first = {c: min(x.stage for x in specs) for c, specs in chains.items()}
    served = served_depths(first, state.cfg.shards, len(state.sequences), state.cfg.slices)
    chosen = select_chains(chain_costs(state, chains), policy, budget, served)
    return [(s, q, first[(s, q)]) for s, q in chosen], len(chains) - len(chosen)


def stale_partitions(state: State) -> dict[int, list[tuple[int, int]]]:
    """Stage -> (shard, sequence) partitions awaiting retraining (shared prefixes counted for every sequence)."""
    rows = state.checkpoint_rows()
    out: dict[int, list[tuple[int, int]]] = {k: [] for k in range(1, state.cfg.slices + 1)}
    for spec in stage_specs(state):
        if not state.intact(spec.key, rows):
            out[spec.stage].append((spec.shard, spec.seq))
    return out


def _stale_in(state: State) -> Callable:
    """Inside a ledger transaction: does any stage await retraining under the versions it sees?"""
    def check(con) -> bool:
        versions = state.ledger.slice_versions(state.cfg.shards, state.cfg.slices, con=con)
        return bool(missing_stages(state, versions, state.checkpoint_rows(con)))

    return check


def mark_retrained(state: State) -> bool:
    """Stamp the deletions retrained once no stage awaits retraining (every door that trains calls it)."""
    return state.ledger.mark_retrained(_stale_in(state))


# --- training ---------------------------------------------------------------------------------------
def train_one(state: State, spec: StageSpec, on_batch=None) -> dict | None:
    """Train and record one stage. StaleStage before training when its data or parent changed since the spec was
    computed; None when that happened during training (the weights are discarded, nothing recorded)."""
    import torch

    from s3t_ops.checkpoints import canonical_bytes
    from s3t_ops.stages import train_stage
    from s3t_ops.trunk import TrunkCache

    rows = state.checkpoint_rows()
    chain, key = [], spec.parent_key
    while key is not None:
        if not state.intact(key, rows):
            raise StaleStage(f"the parent checkpoint of stage {spec.stage} (shard {spec.shard}) is gone")
        chain.append(key)
        key = rows[key]["parent_key"]
    try:
        parents = [state.checkpoints.load(k, rows[k]["sha256"]) for k in reversed(chain)]
    except IntegrityError as exc:
        raise StaleStage(str(exc)) from None
    parts, labels = [], []
    for j, version in zip(spec.prefix, spec.prefix_versions):
        members = state.ledger.members(spec.shard, j)
        if state.ledger.keyring.slice_version(members["id"]) != version:
            raise StaleStage(f"slice {j} of shard {spec.shard} changed (a deletion) after the stage was planned")
        try:
            parts.append(state.slice_trunk(spec.shard, j).subset(members["id"].tolist()))
        except (KeyError, StateError):  # cache missing or behind the ledger: rebuild this slice
            state.data_files.remove(trunk_file(slice_file(spec.shard, j)))
            state.build_trunk(slices=[(spec.shard, j)], eval_splits=False)
            parts.append(state.slice_trunk(spec.shard, j).subset(members["id"].tolist()))
        labels += members["label"].astype(int).tolist()
    trunk = TrunkCache.concat(parts)
    val = state.trunk("val.safetensors")
    started = now()
    result = train_stage(state.backbone, trunk, trunk.ids, torch.tensor(labels, dtype=torch.long), spec.stage, parents,
                         spec.seed, len(state.label_names), val=(val, state.labels(val.ids)), on_batch=on_batch)
    data = canonical_bytes(result.state)
    staged = state.checkpoints.stage(spec.key, data)
    row = dict(key=spec.key, shard=spec.shard, prefix="-".join(map(str, spec.prefix)), stage=spec.stage,
               parent_key=spec.parent_key, slice=spec.slice, slice_version=spec.slice_version,
               prefix_versions=json.dumps(list(spec.prefix_versions)), sha256=hashlib.sha256(data).hexdigest(), n_train=len(trunk),
               grad_example_steps=result.grad_example_steps, steps=result.steps, val_acc=result.val_acc,
               seconds=result.seconds, started_at=started)
    cells = [(spec.shard, j, v) for j, v in zip(spec.prefix, spec.prefix_versions)]
    crash_point("before_checkpoint_record")
    recorded = state.ledger.record_checkpoint(row, cells, place_file=staged.place)
    state.forget_rows()
    if not recorded:
        staged.discard()
        return None
    row = {**row, "epoch_losses": result.epoch_losses, "epoch_accuracies": result.epoch_accuracies, "ended_at": now()}
    state.publisher.stage_trained(row, state.cfg.to_dict(), state.tags)
    return row


def train(state: State, policy: str = "all", budget: int | None = None, workers: int = 1) -> TrainReport:
    """Train the missing stages of the chains the retraining `policy` picks (s3t_ops/policy.py; `all`: every missing
    stage; unchanged prefixes keep their checkpoints), within `budget` example-steps if given, in `workers` processes
    (see the module's docstring). A stage whose data was deleted while it trained is discarded and the new version
    trained instead; deletions are marked retrained only once no stage awaits retraining."""
    t0 = time.perf_counter()
    report = TrainReport()
    report.reused = len({s.key for s in stage_specs(state)}) - len(missing_stages(state))
    picked, report.deferred = chains_to_retrain(state, policy, budget)
    chosen = {(s, q) for s, q, _ in picked}
    for _round in range(5):
        todo, seen = [], set()
        for (s, q), specs in stale_chains(state).items():
            if (s, q) in chosen:
                todo += [x for x in specs if x.key not in seen]
                seen.update(x.key for x in specs)
        todo.sort(key=lambda x: (x.stage, x.shard, x.seq))
        if not todo:
            break
        work = sum(chain_costs(state, {(0, 0): todo}).values())
        with state.bar(work, "training stages") as bar:
            if workers > 1 and len(todo) > 1 and state.cfg.device == "cpu":
                outcomes = run_stages(state, todo, workers, progress=bar.update)
            else:
                outcomes = []
                with one_thread():
                    for spec in todo:
                        bar.set_postfix_str(f"shard {spec.shard} seq {spec.seq} stage {spec.stage}")
                        try:
                            row = train_one(state, spec, on_batch=bar.update)
                        except StaleStage:
                            outcomes.append((spec, "skipped", 0))
                            continue
                        outcomes.append((spec, "discarded", 0) if row is None else (spec, "trained", row["grad_example_steps"]))
        for spec, outcome, steps in outcomes:
            if outcome == "trained":
                report.trained.append(spec)
                report.grad_example_steps += steps
            else:
                setattr(report, outcome, getattr(report, outcome) + 1)
    else:
        raise StateError("deletions kept invalidating the stages being trained; run `s3t train` again")
    mark_retrained(state)
    report.seconds = time.perf_counter() - t0
    return report


def materialize_stage(state: State, shard: int, seq: int, stage: int, on_batch=None) -> tuple[dict, bool]:
    """Stage `stage` of (shard, seq) under the current data: (checkpoint row, reused?). One Dagster partition."""
    spec = next((x for x in stage_specs(state) if (x.shard, x.seq, x.stage) == (shard, seq, stage)), None)
    if spec is None:
        raise StateError(f"no stage {stage} of sequence {seq} in shard {shard} for this config")
    rows = state.checkpoint_rows()
    if state.intact(spec.key, rows):
        return dict(rows[spec.key]), True
    row = train_one(state, spec, on_batch=on_batch)
    if row is None:
        raise StateError(f"stage {stage} of shard {shard}, sequence {seq}: its data or parent changed while it trained "
                         "(a deletion); nothing was recorded, it will retrain")
    mark_retrained(state)  # the last stale stage of every door stamps the deletions retrained
    return row, False


# --- every core ------------------------------------------------------------------------------------
def default_workers() -> int:
    """As many workers as cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def one_thread():
    """Training computes with one intra-op thread, in a worker or alone (so the bytes never depend on the pool)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_STATE: State | None = None  # a worker's own opening of the state


def _die_with(parent: int) -> None:
    """A worker dies with the command that started it (Linux): an orphan finishing its stage after a crash would write
    into a state the next command is already repairing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init(state_dir: str, tags: dict[str, str], parent: int) -> None:
    import torch

    from s3t_ops.opening import open_state

    torch.set_num_threads(1)
    _die_with(parent)
    as_worker_of(parent)
    global _STATE
    _STATE = open_state(state_dir, progress=False)
    _STATE.tags = dict(tags)  # the run's tags (e.g. the Dagster run id) on the stage runs it logs


def _train(key: str) -> tuple[str, str, int]:
    """Train the stage whose key is `key` under the worker's view of the current data: (key, outcome, example-steps)."""
    state = _STATE
    state.forget_rows()
    spec = next((s for s in stage_specs(state) if s.key == key), None)
    if spec is None:
        return key, "skipped", 0  # its data changed since the run planned it (a deletion): the next round recomputes
    try:
        row = train_one(state, spec)
    except StaleStage:
        return key, "skipped", 0
    return (key, "discarded", 0) if row is None else (key, "trained", int(row["grad_example_steps"]))


def _trunk(name: str) -> int:
    from s3t_ops.datafiles import slice_of

    cell = slice_of(name)
    return _STATE.build_trunk(slices=[cell] if cell else [], eval_splits=cell is None)


def pool(state: State, workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                               initargs=(str(state.root), dict(state.tags), os.getpid()))


def run_stages(state: State, todo: Sequence[StageSpec], workers: int, progress: Callable[[int], None] | None = None
               ) -> list[tuple[StageSpec, str, int]]:
    """Train `todo` in `workers` processes; (spec, outcome, example-steps) in the order of `todo`.

    A stage starts as soon as its parent is done (or at once when its parent is not part of the run): no barrier
    between depths, so a worker never idles while another finishes the last stage of a depth. Of the ready stages
    the shallowest goes first: it has the longest chain of work still waiting below it. Only `workers` stages are in
    flight at a time, so this order, not the pool's FIFO queue, decides what runs next."""
    from concurrent.futures import FIRST_COMPLETED, wait

    by_key = {s.key: s for s in todo}
    waiting = {s.key: s.parent_key for s in todo if s.parent_key in by_key}
    def shallowest(spec: StageSpec) -> tuple[int, int, int]:
        return spec.stage, spec.shard, spec.seq

    ready = sorted((s for s in todo if s.key not in waiting), key=shallowest)
    out: dict[str, tuple[str, int]] = {}
    with pool(state, min(workers, len(todo))) as ex:
        running: dict = {}
        while ready or running:
            while ready and len(running) < workers:
                spec = ready.pop(0)
                running[ex.submit(_train, spec.key)] = spec.key
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key, outcome, steps = future.result()
                del running[future]
                out[key] = (outcome, steps)
                if progress is not None:
                    progress(steps)
                if outcome == "trained":
                    for child in [k for k, parent in waiting.items() if parent == key]:
                        del waiting[child]
                        ready.append(by_key[child])
                    ready.sort(key=shallowest)
                else:  # not recorded (a deletion came in): the next round replans the chain below it
                    _skip_below(key, waiting, out)
    state.forget_rows()
    return [(by_key[k], *out[k]) for k in by_key]


def _skip_below(key: str, waiting: dict[str, str | None], out: dict[str, tuple[str, int]]) -> None:
    """Mark every stage below `key` in `waiting` skipped (its ancestor was not trained in this round)."""
    for child in [k for k, parent in waiting.items() if parent == key]:
        del waiting[child]
        out[child] = ("skipped", 0)
        _skip_below(child, waiting, out)


def build_trunk(state: State, workers: int = 1) -> int:
    """Every trunk file not cached yet (or damaged), computed side by side in `workers` processes, a file per task (one
    process on a GPU or for a single file); returns the examples computed."""
    from s3t_ops.datafiles import slice_file, trunk_file

    names = [slice_file(int(s), int(j)) for s, j in state.ledger.slice_counts()[["shard", "slice"]].itertuples(index=False)]
    todo = [n for n in [*names, "val.safetensors", "test.safetensors"] if not state.data_files.intact(trunk_file(n))]
    if workers <= 1 or len(todo) <= 1 or state.cfg.device != "cpu":
        with one_thread():
            return state.build_trunk()
    with pool(state, min(workers, len(todo))) as ex:
        return sum(ex.map(_trunk, todo))

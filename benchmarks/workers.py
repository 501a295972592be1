"""Using every core: `s3t train` on the demo config with 1 worker and with N workers, side by side in one run,
and (with --demo) the wall time of a newcomer's `s3t demo`.

Each measurement is a fresh process on a fresh state folder, exactly as a user types it:

    s3t train --state DIR --workers W --quiet [config flags]

timed from start to exit (ingest, trunk build, every stage, serve, register). The (shard, sequence) chains are
independent, so W workers (one torch thread each) train W chains at a time; the ledger is the only place that
commits. The checkpoints of the two runs must be the same bytes: they are compared by lineage position
(shard/sequence prefix/stage -> sha256 of the file), because checkpoint keys hash keyed slice versions, a
secret per state folder.

Targets (issue 21): speedup of N = all cores over 1 worker >= 1.6x on this 2-core machine; `s3t demo` (its own
data and epochs, nothing cut) <= 300 s. The CPU may be shared: the load average before and after each
measurement is recorded; run it on a quiet machine.

    .venv/bin/python -m benchmarks.workers --out benchmarks/measured --demo      # MiniLM, demo config
    .venv/bin/python -m benchmarks.workers --quick --source CSV --backbone DIR --out /tmp/r   # a smoke run

Writes <out>/workers.json and <out>/workers.png; the state folders are removed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (QUICK, ROOT, base_parser, clean_env, fresh_dir, lineage_checksums, machine, plt, target,
                               write_json)

NAME = "workers"


def config_flags(args, source: bool = True) -> list[str]:
    """The CLI's config flags of a run: none at full size (the demo config is the CLI's default), the QUICK sizes
    with --quick. `s3t demo` always reads the packaged tweets (source=False)."""
    flags: list[str] = []
    if source and args.source:
        flags += ["--source", str(args.source)]
    if args.backbone:
        flags += ["--backbone", str(args.backbone)]
    if args.quick:
        for key in ("shards", "slices", "budget", "n_train", "n_val", "n_test", "epochs", "batch_size", "max_tokens", "lora_rank"):
            flags += [f"--{key.replace('_', '-')}", str(QUICK[key])]
    return flags


def timed_command(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run `cmd` (a fresh process, its own session) and time it; on timeout its whole process group is killed."""
    env = clean_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"{' '.join(cmd[1:4])} ... timed out after {timeout:.0f}s; see {log}") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}): {log.read_text()[-2000:]}")
    return {"wall_s": wall, "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}


def checkpoints_by_lineage(state: Path) -> dict[str, str]:
    from s3t_ops.engine import S3T

    return lineage_checksums(S3T.open(state, progress=False, repair=False))


def measure_train(args, workers: int, root: Path) -> dict:
    state = root / f"train-w{workers}"
    cmd = [sys.executable, "-m", "s3t_ops.cli", "train", "--state", str(state), "--workers", str(workers), "--quiet",
           *config_flags(args)]
    print(f"s3t train --workers {workers} ...", flush=True)
    row = {"workers": workers, **timed_command(cmd, root / f"train-w{workers}.log", args.timeout)}
    row["checkpoints"] = checkpoints_by_lineage(state)
    print(f"  {row['wall_s']:.1f}s wall, {len(row['checkpoints'])} checkpoints "
          f"(load {row['load_avg_1m_before']:.2f} -> {row['load_avg_1m_after']:.2f})", flush=True)
    return row


def measure_demo(args, workers: int, root: Path) -> dict:
    state = root / "demo"
    cmd = [sys.executable, "-m", "s3t_ops.cli", "demo", "--state", str(state), "--workers", str(workers), "--quiet",
           *config_flags(args, source=False)]
    if args.quick:
        cmd += ["--deletions", "2"]
    print(f"s3t demo --workers {workers} ...", flush=True)
    row = {"workers": workers, **timed_command(cmd, root / "demo.log", args.timeout)}
    print(f"  {row['wall_s']:.1f}s wall (load {row['load_avg_1m_before']:.2f} -> {row['load_avg_1m_after']:.2f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    from s3t_ops.training import default_workers

    p = base_parser(NAME, __doc__)
    p.add_argument("--source", default=None, help="CSV/Parquet with text,label columns (default: the packaged tweets)")
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--workers", type=int, default=default_workers(), help="the many-worker run (default: one per core)")
    p.add_argument("--demo", action="store_true", help="also time `s3t demo --workers N` on a fresh folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a measured command is killed")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error(f"--workers must be at least 2 to compare with one worker, got {args.workers}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = fresh_dir(out / f"state-{NAME}")
    info = machine()
    t_start = time.perf_counter()
    try:
        one = measure_train(args, 1, root)
        many = measure_train(args, args.workers, root)
        demo = measure_demo(args, args.workers, root) if args.demo else None
    except RuntimeError as exc:
        logs = out / f"{NAME}-logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        for log in root.glob("*.log"):
            shutil.copy(log, logs / log.name)
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"{NAME}: {exc} (logs kept in {logs})") from None
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out / f"{NAME}-logs", ignore_errors=True)  # an earlier failure's logs
    same = one["checkpoints"] == many["checkpoints"]
    speedup = one["wall_s"] / many["wall_s"]
    targets = [target(f"s3t train: {args.workers} workers >= 1.6x faster than 1", speedup, 1.6),
               {"target": "the same checkpoints, byte for byte, with 1 and with N workers", "measured": same, "met": same}]
    if demo:
        targets.append(target("s3t demo wall time <= 300 s", demo["wall_s"], 300, higher_is_better=False, unit="s"))
    result = {
        "benchmark": NAME, "args": vars(args), "machine": info, "config_flags": config_flags(args),
        "train": [{k: v for k, v in r.items() if k != "checkpoints"} | {"checkpoints": len(r["checkpoints"])} for r in (one, many)],
        "speedup": speedup, "checkpoints_identical": same, "demo": demo, "targets": targets,
        "seconds": time.perf_counter() - t_start,
    }
    png = out / f"{NAME}.png"
    _plot(result, png)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    if not args.quiet:
        for t in targets:
            print(f"target: {t['target']}: measured {t['measured']} -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path} and {png}")
    return result


def _plot(result: dict, png: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 3.8), dpi=120)
    rows = [(f"s3t train\n{r['workers']} worker(s)\nload {r['load_avg_1m_before']:.1f}", r["wall_s"], "tab:blue") for r in result["train"]]
    if result["demo"]:
        d = result["demo"]
        rows.append((f"s3t demo\n{d['workers']} worker(s)\nload {d['load_avg_1m_before']:.1f}", d["wall_s"], "tab:orange"))
        ax.axhline(300, color="tab:orange", linestyle="--", linewidth=1, label="demo target 300 s")
        ax.legend(fontsize=8)
    ax.bar(range(len(rows)), [r[1] for r in rows], color=[r[2] for r in rows])
    for i, r in enumerate(rows):
        ax.text(i, r[1], f"{r[1]:.0f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("wall seconds (fresh process, fresh state)")
    ax.set_title(f"speedup {result['speedup']:.2f}x; checkpoints identical: {result['checkpoints_identical']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    pyplot.close(fig)


if __name__ == "__main__":
    main()

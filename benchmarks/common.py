"""Shared helpers of the benchmark scripts: config flags, machine description, state setup, output."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` works as well as `python -m benchmarks.x`
    sys.path.insert(0, str(ROOT))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every default."""


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description, formatter_class=HelpFormatter)
    p.add_argument("--out", default="results", help="results folder; writes <out>/%s.json and <out>/%s.png" % (name, name))
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); for smoke tests, not for reported figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice, usually one per core)")
    return p


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def model_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """Data/model flags shared by the benchmarks that train (defaults chosen per benchmark)."""
    from s3t_ops.sequences import SELECTIONS

    g = p.add_argument_group("data and model")
    g.add_argument("--source", default=None, help="CSV/Parquet with text,label columns (default: the packaged tweets)")
    g.add_argument("--backbone", default=None, help="local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--shards", type=int, default=defaults.get("shards", 5), help="m")
    g.add_argument("--slices", type=int, default=defaults.get("slices", 3), help="L (= LoRA groups)")
    g.add_argument("--budget", type=int, default=defaults.get("budget", 3), help="B, S3T sequences per shard")
    g.add_argument("--selection", default="cyclic", choices=SELECTIONS, help="S3T sequence selection")
    g.add_argument("--n-train", type=int, default=defaults.get("n_train", 1500), help="training examples")
    g.add_argument("--n-val", type=int, default=defaults.get("n_val", 200), help="validation examples")
    g.add_argument("--n-test", type=int, default=defaults.get("n_test", 500), help="test examples")
    g.add_argument("--epochs", type=int, default=defaults.get("epochs", 2), help="epochs per stage / per model / per slice step")
    g.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32))
    g.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3))
    g.add_argument("--lora-rank", type=int, default=defaults.get("lora_rank", 8))
    g.add_argument("--max-tokens", type=int, default=defaults.get("max_tokens", 32))
    g.add_argument("--seed", type=int, default=0)


QUICK = dict(shards=2, slices=2, budget=2, n_train=40, n_val=8, n_test=16, epochs=1, batch_size=8, max_tokens=16, lora_rank=4)


def make_config(args: argparse.Namespace, state_dir: Path, **overrides: Any):
    from s3t_ops.config import S3TConfig

    values = dict(shards=args.shards, slices=args.slices, budget=args.budget, selection=args.selection, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
                  max_tokens=args.max_tokens, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                  backbone=args.backbone, state_dir=state_dir)
    if args.quick:
        values.update({k: v for k, v in QUICK.items() if k in values})
        values["lora_alpha"] = 2 * values["lora_rank"]
    values.update(overrides)
    return S3TConfig(**values)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def prepare_engine(cfg, source: str | None, progress: bool, publisher=None):
    """Ingest into a new state folder and cache the trunk; returns (engine, seconds). Benchmarks publish to no
    registry unless a publisher is given (the ledger alone records their runs)."""
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher

    t0 = time.perf_counter()
    engine = S3T.create(cfg, source, progress=progress, publisher=publisher or Publisher())
    engine.build_trunk()
    return engine, time.perf_counter() - t0


def machine() -> dict[str, Any]:
    """What the figures were measured on (the CPU may be shared: the load average is recorded too)."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf (written as null) so every reader accepts the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    """Atomically (s3t_ops/files.py): the resumable benchmarks reread this file, so a kill while it is
    written must leave the previous results whole, not half a JSON."""
    from s3t_ops.files import write_text

    return write_text(out / f"{name}.json", json.dumps(_clean(data), indent=2, default=str))


def lineage_positions(engine) -> dict[str, str]:
    """checkpoint key -> its lineage position "shard/sequence prefix/stage". Keys hash keyed slice versions (a secret
    per state folder), so two states name the same training differently; positions compare them."""
    return {k: f"{r['shard']}/{r['prefix']}/{r['stage']}" for k, r in engine.checkpoint_rows().items()}


def lineage_checksums(engine) -> dict[str, str]:
    """lineage position -> sha256 of the checkpoint file: what "the same bytes" means across two state folders."""
    import hashlib

    return {pos: hashlib.sha256(engine.checkpoints.path(k).read_bytes()).hexdigest()
            for k, pos in lineage_positions(engine).items()}


def val_test_logits(system) -> list:
    """Per-shard logits on val and test together (more examples, smaller error bars), in shard order."""
    import torch

    val, test = system.shard_logits("val"), system.shard_logits("test")
    return [torch.cat([val[s], test[s]]) for s in sorted(val)]


def val_test_labels(data) -> "torch.Tensor":
    """The labels matching `val_test_logits` rows."""
    import torch

    return torch.cat([data.eval_labels("val"), data.eval_labels("test")])


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def bar(total: int | None, desc: str, quiet: bool, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False)


def target(name: str, value: float | None, threshold: float, higher_is_better: bool = True, unit: str = "x") -> dict[str, Any]:
    met = None if value is None or not math.isfinite(value) else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "measured": value, "threshold": threshold, "unit": unit, "met": met}


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without S3T_/MLFLOW_/DAGSTER_ settings (a benchmark sets its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3T_", "MLFLOW_", "DAGSTER_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


class DagsterDev:
    """`dagster dev` on 127.0.0.1 with its own DAGSTER_HOME (the repository's dagster.yaml template), as a user
    starts it; stopped (its whole process group) on exit, even after an error."""

    def __init__(self, home: Path, env: dict[str, str], start_timeout: float = 300):
        import socket

        self.home = Path(home).resolve()  # Dagster refuses a relative DAGSTER_HOME (and --out is usually relative)
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "pipelines" / "dagster.yaml", self.home / "dagster.yaml")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {**env, "DAGSTER_HOME": str(self.home)}
        self.start_timeout = start_timeout

    def __enter__(self) -> "DagsterDev":
        import signal
        import subprocess
        import urllib.request

        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a killed benchmark still stops its servers
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

        self.log = open(self.home / "dagster.log", "w")
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(ROOT / "workspace.yaml"),
                                      "-h", "127.0.0.1", "-p", str(self.port)], cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.start_timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/server_info", timeout=2)
                return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"dagster dev did not start; see {self.home / 'dagster.log'}")
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        import subprocess

        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        self.log.close()

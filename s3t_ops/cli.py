"""`s3t`: train S3T models, honour deletions at once, inspect the served plan; approximate unlearning (`s3t unlearn`).

Each command makes one call into the engine's lifecycle (`S3T.create(...)` or `S3T.open(...)`, then `.fit()` or `.forget(ids)`),
which first repairs what a crash left and reports to the state's registry (MLflow by default). Errors are one line
naming the problem, exit code 2, and the state is left as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

DEFAULT_STATE = os.environ.get("S3T_STATE", "s3t_state")
# read once: mlflow.set_tracking_uri() writes this variable, so later reads in-process see the last store used
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None
# config flags -> S3TConfig fields (flags default to None, so an explicit flag is known apart from a default)
CONFIG_FLAGS = {"shards": "shards", "slices": "slices", "budget": "budget", "selection": "selection",
                "deletion_prior": "deletion_prior", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                "lora_rank": "lora_rank", "max_tokens": "max_tokens", "n_train": "n_train", "n_val": "n_val",
                "n_test": "n_test", "seed": "seed", "backbone": "backbone", "storage_url": "storage_url"}


def _config_args(p: argparse.ArgumentParser) -> None:
    from s3t_ops.config import S3TConfig
    from s3t_ops.sequences import SELECTIONS

    d = S3TConfig()
    g = p.add_argument_group("model config (fixed when a state folder is created; on an existing state a flag must match it)")
    g.add_argument("--shards", type=int, help=f"m, number of shards (default {d.shards})")
    g.add_argument("--slices", type=int, help=f"L, slices per shard = LoRA groups (default {d.slices})")
    g.add_argument("--budget", type=int, help=f"B, sequences per shard (default {d.budget})")
    g.add_argument("--selection", choices=SELECTIONS, help=f"sequence selection (default {d.selection})")
    g.add_argument("--deletion-prior", type=float, nargs="+", help="per-slice deletion probabilities for --selection bms")
    g.add_argument("--epochs", type=int, help=f"epochs per stage (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"learning rate of LoRA and head (default {d.lr})")
    g.add_argument("--lora-rank", type=int, help=f"LoRA rank r; alpha = 2r (default {d.lora_rank})")
    g.add_argument("--max-tokens", type=int, help=f"tokens per text (default {d.max_tokens})")
    g.add_argument("--n-train", type=int, help=f"training examples to sample (default {d.n_train}; 0 = all)")
    g.add_argument("--n-val", type=int, help=f"(default {d.n_val})")
    g.add_argument("--n-test", type=int, help=f"(default {d.n_test})")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--backbone", help="local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--storage-url", help="where the trunk cache, slice files and checkpoints live: an fsspec URL "
                                         "(s3://bucket/prefix, gs://..., a folder); default: the state folder. The ledger stays there")


def _explicit(args: argparse.Namespace) -> dict:
    """Config fields the user gave on the command line."""
    out = {}
    for flag, name in CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if name == "deletion_prior":
            value = tuple(value)
        if name == "n_train" and value == 0:
            value = None
        out[name] = value
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


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default=DEFAULT_STATE, help="state folder: ledger, trunk cache, checkpoints, registry (default: $S3T_STATE or ./s3t_state)")


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
    p.add_argument("--fresh", action="store_true", help="delete an existing state folder first")
    p.add_argument("--deletions", type=int, default=4, help="random training examples to forget, one request at a time (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _config_args(p)

    p = sub.add_parser("train", help="ingest data into a new state folder (or reuse one), train every missing stage, serve and register")
    _state_arg(p)
    p.add_argument("--source", default=None, help="CSV/Parquet with text,label[,id] columns, UTF-8 (default: the packaged tweets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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

    _unlearn_parser(sub)
    return parser


def _unlearn_parser(sub) -> None:
    from s3t_ops.memorization.config import UNLEARN_METHODS, UNLEARN_PROXIES, MemorizationConfig

    d = MemorizationConfig()
    p = sub.add_parser(
        "unlearn", help="APPROXIMATE unlearning (RUM and baselines) of a monolithic model on the state's data, scored against a retrained oracle",
        description="APPROXIMATE unlearning, for models not trained with S3T: a monolithic model (the frozen backbone, LoRA on "
                    "the top --depth group(s), a head) is trained on the state's live training data (cached under "
                    "memorization/ in the state's storage: the state folder or its --storage-url), then the forget set "
                    "is unlearned by --method and scored against an oracle retrained without it (accuracy on "
                    "forget/retain/test, SVC-MIA, ToW, ToW-MIA). No guarantee holds: "
                    "the weights may still carry information about the forgotten examples. The S3T state (ledger, "
                    "checkpoints, served model) is NOT changed; `s3t forget` is the exact path. Writes "
                    "memorization/runs/<stamp>-<method>/report.json (+ report.png, the unlearned model) and "
                    "logs one MLflow run per variant and seed.")
    _state_arg(p)
    p.add_argument("--method", default="rum", choices=UNLEARN_METHODS,
                   help="rum: full RUM (nothing -> fine-tune -> SalUn over low/mid/high memorization bins); rum_f: RUM^F "
                        "(NegGrad+ in every bin); vanilla: NegGrad+ on the whole forget set; or one method on the whole "
                        "forget set (default %(default)s)")
    p.add_argument("--proxy", default="confidence", choices=UNLEARN_PROXIES,
                   help="what RUM ranks the forget set by: a training-time proxy, holdout retraining, or the free estimate "
                        "from the S3T checkpoint inventory (default %(default)s; unused by single methods)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--forget", metavar="FILE", help="ids to forget: one per line, or a CSV with an `id` column "
                                                        "(live training examples of the state)")
    which.add_argument("--n-forget", type=int, default=30, metavar="N", help="without --forget: this many training ids chosen by a seeded hash (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds --seed, --seed+1, ... (same forget set); the report "
                                                        "gives mean and 95%% interval (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="first seed (default %(default)s)")
    p.add_argument("--controls", action="store_true", help="with rum/rum_f: also run the shuffle control (random bins) and vanilla NegGrad+")
    p.add_argument("--no-oracle", action="store_true", help="skip retraining the oracle: accuracies and MIA only, no ToW")
    p.add_argument("--depth", type=int, default=d.depth, help="top groups with a trained LoRA (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the original model and the oracle (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="their learning rate (AdamW, default %(default)s)")
    p.add_argument("--retrain", action="store_true", help="retrain the cached original model")
    p.add_argument("--tracking-uri", default=ENV_TRACKING_URI, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or <state>/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _read_id_file(name: str) -> list[str]:
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file of ids")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        import io

        import pandas as pd

        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise ValueError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
        if "id" not in frame.columns:
            raise ValueError(f"{path}: needs an `id` column (found {', '.join(frame.columns) or 'none'})")
        ids = frame["id"].str.strip()
        blank = [i + 2 for i, v in enumerate(ids) if not v]  # +2: header line, 1-based
        if blank:
            raise ValueError(f"{path}: blank id on line(s) {blank[:5]}; nothing was deleted")
        return ids.tolist()
    return [line.strip() for line in text.splitlines() if line.strip()]


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
    run_demo(cfg, deletions=args.deletions, progress=not args.quiet)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from s3t_ops.engine import S3T

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
    report = engine.fit()
    plan = engine.served_plan()
    version = engine.ledger.publication(engine.served()[0])[1]
    if report.discarded:
        print(f"discarded {report.discarded} stage(s) trained on data deleted meanwhile (never recorded; retrained on the new data)")
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
    engine = _open(state, warn=False, check_registry=True)
    served = engine.served()
    dels = engine.ledger.deletions()
    counts = engine.examples().groupby("split").size().to_dict()
    missing = engine.missing_stages()
    out = {
        "state": str(state), "config": engine.cfg.to_dict(), "examples": {k: int(v) for k, v in counts.items()},
        "sequences": [list(p) for p in engine.sequences],
        "deletions": {"total": len(dels), "honoured": int(dels["honoured_at"].notna().sum()),
                      "erased": int(dels["erased_at"].notna().sum()), "retrained": int(dels["retrained_at"].notna().sum())},
        "served_plan": None if served is None else {"plan_id": served[0], **served[1]["plan"]},
        "registry": {"version": engine.ledger.publication(served[0])[1] if served else None,
                     "published": bool(served and engine.ledger.publication(served[0])[0] is not None),
                     "pending_erasure": len(engine.ledger.pending_erasure("registry")),
                     "error": engine.last_repair.registry_error,
                     **{k: v for k, v in engine.publisher.describe().items()}},
        "stages": {"total": len({s.key for s in engine.stage_specs()}), "awaiting_retraining": len(missing)},
        "repaired": engine.last_repair.actions,
    }
    if example_id is not None:
        out["example"] = example_state(engine, example_id)
    return out


def example_state(engine, example_id: str) -> dict:
    live = engine.examples()
    row = live[live["id"] == example_id]
    if len(row):
        r = row.iloc[0]
        return {"id": example_id, "state": "live", "split": r["split"],
                **({"shard": int(r["shard"]), "slice": int(r["slice"])} if r["split"] == "train" else {})}
    tomb = engine.ledger.tombstone(example_id)
    dels = engine.ledger.deletions()
    hit = dels[dels["tombstone"] == tomb]
    if not len(hit):
        return {"id": example_id, "state": "unknown"}
    d = hit.iloc[0]
    return {"id": example_id, "state": "deleted", "tombstone": tomb,
            **{k: (None if pd_isna(d[k]) else str(d[k])) for k in ("requested_at", "honoured_at", "erased_at", "retrained_at")},
            "honoured_by_plan": None if pd_isna(d["honoured_by_plan"]) else int(d["honoured_by_plan"])}


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


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
            engine.store.read(k, engine.checkpoint_rows()[k]["sha256"])
    print(json.dumps({"plan_id": served[0], **served[1]}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    engine = _open(args.state)
    labels, probs = engine.ensemble().predict(args.texts)
    names = engine.label_names
    for text, y, p in zip(args.texts, labels.tolist(), probs.tolist()):
        print(json.dumps({"text": text, "label": names[y], "probabilities": dict(zip(names, [round(x, 4) for x in p]))}))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    engine = _open(args.state, warn=False, check_registry=True)
    for line in engine.last_repair.actions:
        print(f"repaired: {line}")
    if not engine.last_repair.actions:
        print(f"{args.state}: nothing to repair")
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from s3t_ops.memorization.config import MemorizationConfig
    from s3t_ops.memorization.report import format_report
    from s3t_ops.memorization.service import unlearn_command

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    forget = None
    if args.forget:
        forget = _read_id_file(args.forget)
        if not forget:
            raise ValueError(f"{args.forget}: no ids in the file")
    elif args.n_forget < 1:
        raise ValueError(f"--n-forget must be >= 1, got {args.n_forget}")
    mcfg = MemorizationConfig(depth=args.depth, epochs=args.epochs, lr=args.lr, seed=args.seed)
    import logging
    import warnings

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no store-migration chatter between the bar and the report
    with warnings.catch_warnings():  # mlflow nags about type hints on import
        warnings.simplefilter("ignore", UserWarning)
        import s3t_ops.registry  # noqa: F401
    bar = None

    def progress(total: int, phase: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=total, desc="approximate unlearning", unit="phase", dynamic_ncols=True, file=sys.stderr)
        else:
            bar.update(1)
        bar.set_postfix_str(phase)

    try:
        result = unlearn_command(args.state, method=args.method, proxy=args.proxy, forget_ids=forget, n_forget=args.n_forget,
                                 seeds=args.seeds, controls=args.controls, with_oracle=not args.no_oracle, mcfg=mcfg,
                                 tracking_uri=args.tracking_uri, retrain=args.retrain, progress=progress)
    except KeyError as exc:  # forget ids that are not live training examples
        raise ValueError(exc.args[0] if exc.args else str(exc)) from None
    finally:
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_report(result))
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "demo": cmd_demo, "train": cmd_train, "forget": cmd_forget, "status": cmd_status,
            "serve-plan": cmd_serve_plan, "predict": cmd_predict, "repair": cmd_repair}


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

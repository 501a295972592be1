"""`s3t unlearn`: APPROXIMATE unlearning of a monolithic model on a state's data (the memorization package's door)."""
from __future__ import annotations

import argparse
import json
import sys

from s3t_ops.args import read_id_file as _read_id_file
from s3t_ops.args import state_arg as _state_arg


def add_unlearn_parser(sub) -> None:
    from s3t_ops.config import flag_fields, plain_type
    from s3t_ops.publish import user_tracking_uri
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
    p.add_argument("--controls", action="store_true", help="with rum/rum_f: also run the shuffle control (random bins) and vanilla NegGrad+")
    p.add_argument("--no-oracle", action="store_true", help="skip retraining the oracle: accuracies and MIA only, no ToW")
    for f in flag_fields(MemorizationConfig):  # declared once, in MemorizationConfig (s3t_ops/memorization/config.py)
        if f.name != "subsample_models":  # not used by `unlearn` (the subsampled score is the Dagster job's)
            p.add_argument("--" + f.name.replace("_", "-"), type=plain_type(f), default=getattr(d, f.name),
                           help=f.metadata["help"] + " (default %(default)s)")
    p.add_argument("--retrain", action="store_true", help="retrain the cached original model")
    p.add_argument("--tracking-uri", default=user_tracking_uri(),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or <state>/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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

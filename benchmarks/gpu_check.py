"""GPU check: train a stage set on the GPU, forget an example, retrain, and compare with a from-scratch run on the GPU
byte for byte; then report stage training's example-steps/s against the FLOP floor of a MiniLM stage.

Everything it needs is local (no hub, no registry): the backbone folder (--backbone; default the packaged MiniLM, found
in the installed wheel), the data (--source; default the packaged tweets), torch with CUDA, and this repository.
States publish to no registry. Deterministic kernels are on (`torch.use_deterministic_algorithms`, cuBLAS's
`CUBLAS_WORKSPACE_CONFIG=:4096:8`): retraining equals training from scratch on the same GPU model and software, which
this check asserts (not against the CPU: a GPU's kernels are not the CPU's; `device` is in the training fingerprint).

FLOP floor: a stage's example-step costs about 3x the forward FLOPs of the blocks it runs (forward, backward through
them for the activations, the small LoRA gradients), with forward FLOPs per block and token of a BERT block:
2*(4*H^2 + 2*H*I) + 4*T*H (H hidden, I intermediate, T tokens). The share of the floor is achieved FLOP/s over
--peak-tflops (default: the fp32 peak of the GPU found, from a small table; give it for another GPU).
Writes gpu_check.json. Exit code 1 when the bitwise check fails.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, machine, write_json

NAME = "gpu_check"
FP32_PEAK_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "L4": 30.3, "A10": 31.2, "T4": 8.1}


def stage_flops(n_blocks: int, hidden: int, intermediate: int, tokens: int) -> float:
    """FLOPs of one example-step of a stage running `n_blocks` blocks (forward + backward ~ 3x forward)."""
    per_token_block = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * hidden
    return 3.0 * per_token_block * tokens * n_blocks


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--source", default=None, help="CSV/Parquet with text,label (default: the packaged tweets)")
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--stage-model", default="full_depth", choices=["layered", "full_depth"])
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak FLOP/s for the floor (default: from its name)")
    p.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same steps as a dry run")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.shards, args.slices, args.epochs = 60, 2, 2, 1
    import torch

    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.publish import Publisher

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch finds no GPU here; run it on a GPU machine (or --device cpu for a dry run)", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    work = out / f"state-{NAME}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    secret = bytes(range(32))  # the two states share a keyspace: their keys are comparable
    import pandas as pd

    from s3t_ops.data import build_dataset, load_source

    n_val = n_test = 500 if not args.quick else 8
    # one fixed data set (its split is decided by id hashes, so dropping a training example moves no other one)
    subset = build_dataset(load_source(args.source), args.n_train, n_val, n_test, 0).frame
    data_a = work / "data.parquet"  # Parquet: tweets hold carriage returns a CSV round trip would split on
    subset.assign(label=subset["label"].map(lambda i: f"class{i}"))[["text", "label"]].to_parquet(data_a, index=False)
    cfg = S3TConfig(shards=args.shards, slices=args.slices, budget=args.slices, epochs=args.epochs, n_train=None,
                    n_val=n_val, n_test=n_test, backbone=args.backbone, stage_model=args.stage_model, device=args.device,
                    state_dir=work / "a")
    if args.quick:
        cfg = cfg.replace(max_tokens=16, lora_rank=4, lora_alpha=8, batch_size=8)
    result = {"benchmark": NAME, "args": vars(args), "machine": machine(), "config": cfg.to_dict()}

    engine = S3T.create(cfg, data_a, progress=not args.quiet, publisher=Publisher(), secret=secret)
    t = time.perf_counter()
    engine.state.build_trunk()
    result["trunk_seconds"] = time.perf_counter() - t
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fit = engine.fit()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    result["fit"] = {"seconds": seconds, "grad_example_steps": fit.grad_example_steps, "stages": len(fit.trained),
                     "example_steps_per_s": fit.grad_example_steps / seconds}
    victim = engine.examples("train")["id"].iloc[0]
    text = engine.examples().set_index("id").loc[victim, "text"]
    engine.forget([victim])
    t = time.perf_counter()
    retrain = engine.retrain()
    result["retrain"] = {"seconds": time.perf_counter() - t, "stages": len(retrain.trained)}

    scratch_cfg = cfg.replace(state_dir=work / "b")
    source_b = work / "without.parquet"
    frame = pd.read_parquet(data_a)
    frame[frame["text"] != text].to_parquet(source_b, index=False)
    scratch = S3T.create(scratch_cfg, source_b, progress=not args.quiet, publisher=Publisher(), secret=secret)
    scratch.fit()
    ours = {(s.shard, s.seq, s.stage): s.key for s in engine.stage_specs()}
    theirs = {(s.shard, s.seq, s.stage): s.key for s in scratch.stage_specs()}
    same_keys = ours == theirs
    same_bytes = same_keys and all(engine.checkpoints.path(k).read_bytes() == scratch.checkpoints.path(k).read_bytes()
                                   for k in ours.values())
    result["bitwise_retrain_equals_scratch"] = bool(same_bytes)
    result["keys_equal"] = bool(same_keys)

    bb = engine.backbone
    conf = bb.encoder.config
    per_block = stage_flops(1, conf.hidden_size, conf.intermediate_size, cfg.max_tokens)
    blocks_run = {}
    for spec in engine.stage_specs():
        blocks_run[spec.key] = len(bb.layout.blocks(1)) * cfg.active_groups(spec.stage)
    mean_blocks = sum(blocks_run.values()) / max(1, len(blocks_run))
    flops = per_block * mean_blocks * fit.grad_example_steps
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
    result["flops"] = {"per_example_step": per_block * mean_blocks, "achieved_tflops": flops / seconds / 1e12,
                       "peak_tflops": peak, "share_of_floor": None if not peak else flops / seconds / (peak * 1e12),
                       "gpu": name}
    write_json(out, NAME, result)
    if not args.quiet:
        print(json.dumps({k: result[k] for k in ("fit", "retrain", "bitwise_retrain_equals_scratch", "flops")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if not same_bytes:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()

"""Benchmark 5: serving an m-shard S3T ensemble with the shared trunk vs independent shard forwards (m = 5).

Shared trunk (`Ensemble.logits`): the frozen backbone runs once per input, up to the first block
any shard needs; each shard then runs only its own groups. Independent (`Ensemble.shard_logits_separate`):
every shard model runs the whole network from the embeddings. Both tokenize once and average logits;
their outputs are checked to agree. The gain depends on the served depths, so several depth profiles
are measured: after deletions shards serve shorter prefixes (depth < L) and share more of the trunk.
Timing does not depend on weight values, so the shard models are random LoRA checkpoints (non-zero
B, random heads) on the real backbone: nothing is trained (about 5 minutes on 2 shared CPU cores).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import apply_threads, bar, base_parser, machine, make_config, model_args, plt, target, write_json

NAME = "serving"


def random_states(backbone, depth: int, num_labels: int, seed: int) -> list[dict]:
    """Stage checkpoints 1..depth with random (non-identity) LoRA weights and heads."""
    import torch

    from s3t_ops.backbone import new_head
    from s3t_ops.checkpoints import join_state

    states = []
    g = torch.Generator().manual_seed(seed)
    for k in range(1, depth + 1):
        backbone.reset_group(k, seed + k)
        lora = {key: (v + 0.02 * torch.randn(v.shape, generator=g)) if "lora_B" in key else v for key, v in backbone.group_state(k).items()}
        head = new_head(backbone.hidden_size, num_labels, seed + 100 + k)
        states.append(join_state(lora, {n: t.detach().clone() for n, t in head.state_dict().items()}))
    return states


def profiles(L: int, m: int) -> dict[str, list[int]]:
    out = {f"all depth {d}": [d] * m for d in range(L, 0, -1)}
    if L > 1:
        out["mixed (after deletions)"] = [max(1, L - (i % L)) for i in range(m)]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    model_args(p, shards=5, n_train=1, n_val=1, n_test=256)
    p.add_argument("--texts", type=int, default=256, help="test tweets per request batch")
    p.add_argument("--serve-batch", type=int, default=64, help="batch size inside each forward")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path and profile (median reported; alternating)")
    args = p.parse_args(argv)
    apply_threads(args)
    import torch

    from s3t_ops.backbone import Backbone
    from s3t_ops.data import build_dataset, load_source
    from s3t_ops.ensemble import Ensemble, ShardModel

    if args.quick:
        args.texts, args.repeats = 16, 1
    out = Path(args.out)
    t_start = time.perf_counter()
    info = machine()
    cfg = make_config(args, out / "unused-state", n_train=1, n_val=1, n_test=args.texts)
    m = cfg.shards
    backbone = Backbone(cfg)
    ds = build_dataset(load_source(args.source), cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    texts = ds.split("test")["text"].tolist()
    n_labels = len(ds.label_names)
    L = cfg.slices
    profs = profiles(L, m)
    results = {}
    with bar(len(profs) * args.repeats * 2, f"serving {len(texts)} texts, m={m}", args.quiet, unit="pass") as pb:
        for name, depths in profs.items():
            models = [ShardModel(s, d, random_states(backbone, d, n_labels, 1000 * s)) for s, d in enumerate(depths)]
            ens = Ensemble(backbone, models, n_labels)
            shared_t, indep_t = [], []
            ens.logits(texts[:8]), ens.shard_logits_separate(texts[:8])  # warm-up: first-call allocations are not serving cost
            for _ in range(args.repeats):
                t = time.perf_counter()
                shared = ens.logits(texts, batch_size=args.serve_batch)
                shared_t.append(time.perf_counter() - t)
                pb.update()
                t = time.perf_counter()
                indep = torch.stack(list(ens.shard_logits_separate(texts, batch_size=args.serve_batch).values())).mean(0)
                indep_t.append(time.perf_counter() - t)
                pb.update()
            diff = float((shared - indep).abs().max())
            s, i = statistics.median(shared_t), statistics.median(indep_t)
            blocks = backbone.layout.n_blocks
            starts = [backbone.layout.start_block(d) for d in depths]
            block_passes_shared = max(starts) + sum(blocks - b for b in starts)  # frozen pass up to the deepest start, then each shard
            results[name] = {"depths": depths, "shared_seconds": s, "independent_seconds": i, "speedup": i / s,
                             "shared_runs": shared_t, "independent_runs": indep_t, "max_abs_logit_difference": diff,
                             "block_passes_shared": block_passes_shared, "block_passes_independent": m * blocks,
                             "ideal_speedup": m * blocks / block_passes_shared}
    full = results[f"all depth {L}"]
    result = {"benchmark": NAME, "args": vars(args), "machine": info, "config": cfg.to_dict(), "m": m, "texts": len(texts),
              "blocks": backbone.layout.n_blocks, "profiles": results,
              "targets": [target(f"shared-trunk serving >= 2x faster than independent forwards at m={m}, full depth (no deletions)",
                                 full["speedup"], 2.0)] +
                         [target(f"shared-trunk serving >= 2x at m={m}, {name}", r["speedup"], 2.0) for name, r in results.items() if name != f"all depth {L}"],
              "seconds": time.perf_counter() - t_start}
    png = out / f"{NAME}.png"
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(9, 4.2), dpi=120)
    names = list(results)
    w = 0.38
    ax.bar([i - w / 2 for i in range(len(names))], [results[n]["shared_seconds"] for n in names], w, label="shared trunk", color="tab:blue")
    ax.bar([i + w / 2 for i in range(len(names))], [results[n]["independent_seconds"] for n in names], w, label="independent shard forwards", color="tab:grey")
    for i, n in enumerate(names):
        r = results[n]
        ax.text(i, max(r["shared_seconds"], r["independent_seconds"]), f"{r['speedup']:.2f}x\n(ideal {r['ideal_speedup']:.2f}x)",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), [f"{n}\n{results[n]['depths']}" for n in names], fontsize=7)
    ax.set_ylabel(f"seconds for {len(texts)} texts (median)")
    ax.set_title(f"serving m={m} shards (L={L} groups over {backbone.layout.n_blocks} blocks)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    pyplot.close(fig)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    if not args.quiet:
        for n, r in results.items():
            print(f"{n:26s} depths {r['depths']}: shared {r['shared_seconds']:.2f}s, independent {r['independent_seconds']:.2f}s -> "
                  f"{r['speedup']:.2f}x (block-count ideal {r['ideal_speedup']:.2f}x; max logit diff {r['max_abs_logit_difference']:.1e})")
        for t in result["targets"]:
            print(f"target: {t['target']}: {t['measured']:.2f}x -> {'MET' if t['met'] else 'not met'}")
        print(f"wrote {path} and {png} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()

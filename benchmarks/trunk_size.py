"""Trunk cache: bytes per example of each storage layout, and what the smaller ones change.

The trunk cache grows with the data (one entry per example), so its size decides how far one disk goes.
On N packaged tweets with the packaged MiniLM (L groups, max_tokens T), this writes the cache file each
layout would store and reports its size per example:
- `legacy`: the layout before the compact trunk: every group boundary (block 0 included) as float32
  [T, H] and the mask as int64 (rebuilt here from the same pass, for the comparison);
- `float32`, `float16`, `bfloat16`: today's layout (block 0 kept as token ids and recomputed by the
  embedding layer, uint8 mask, the other boundaries in `trunk_dtype`).
It also checks that block 0 recomputed from the ids equals the stored embedding output bit for bit and
reports the largest error of the narrowed boundaries once widened back to float32. (Accuracy with a
float16 trunk: the `trunk_fp16` variant of `benchmarks.stage_ablation`.)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import apply_threads, base_parser, machine, plt, write_json

NAME = "trunk_size"
LAYOUTS = ("legacy", "float32", "float16", "bfloat16")


def legacy_bytes(backbone, texts: list[str], ids: list[str]) -> int:
    """The file the pre-compact layout wrote for these examples: float32 at every boundary, int64 mask."""
    import json

    import torch
    from safetensors.torch import save as save_bytes

    input_ids, mask = backbone.tokenize(texts)
    states = backbone.trunk_states(input_ids, mask, backbone.layout.start_blocks())
    tensors = {"mask": mask.to(torch.int64).contiguous(), **{f"h{b}": h.float().contiguous() for b, h in states.items()}}
    return len(save_bytes(tensors, metadata={"ids": json.dumps(ids)}))


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--n", type=int, default=1000, help="tweets to cache")
    p.add_argument("--slices", type=int, default=3, help="L: groups, so boundaries")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged MiniLM)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.slices = 16, 2
    if args.n < 1:
        p.error("--n must be >= 1")
    apply_threads(args)
    import torch

    from s3t_ops.backbone import Backbone
    from s3t_ops.config import S3TConfig
    from s3t_ops.data.sources import load_packaged_tweets
    from s3t_ops.trunk import compute_trunk

    frame = load_packaged_tweets().head(args.n)
    texts, ids = frame["text"].tolist(), [f"t{i}" for i in range(len(frame))]
    rows, reference = {}, None
    for layout in LAYOUTS:
        dtype = "float32" if layout == "legacy" else layout
        cfg = S3TConfig(slices=args.slices, budget=args.slices, max_tokens=args.max_tokens, trunk_dtype=dtype, backbone=args.backbone)
        backbone = Backbone(cfg, args.backbone)
        if layout == "legacy":
            size = legacy_bytes(backbone, texts, ids)
            rows[layout] = {"file_bytes": size, "bytes_per_example": size / len(ids)}
            continue
        cache = compute_trunk(backbone, ids, texts)
        size = len(cache.to_bytes())
        row = {"file_bytes": size, "bytes_per_example": size / len(ids), "boundaries": cache.blocks()}
        if reference is None:
            reference = cache
            if 0 in cache.blocks():  # a backbone whose block count L does not divide leaves block 0 unadapted
                full = backbone.trunk_states(*backbone.tokenize(texts), [0])[0]
                row["block0_recomputed_equal"] = bool(torch.equal(cache.batch(torch.arange(len(ids)), 0, backbone.embed)[0], full))
        else:
            row["max_abs_error"] = max(float((cache.hidden[b].float() - reference.hidden[b]).abs().max()) for b in cache.hidden)
            row["max_abs_value"] = max(float(reference.hidden[b].abs().max()) for b in reference.hidden)
        rows[layout] = row
    base = rows["legacy"]["bytes_per_example"]
    for row in rows.values():
        row["vs_legacy"] = row["bytes_per_example"] / base
    result = {"benchmark": NAME, "args": vars(args), "machine": machine(), "n": len(ids), "layouts": rows}
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.4), dpi=120)
    kb = [rows[k]["bytes_per_example"] / 1000 for k in LAYOUTS]
    ax.bar(LAYOUTS, kb, color=["tab:gray", "tab:blue", "tab:green", "tab:olive"])
    for i, v in enumerate(kb):
        ax.text(i, v, f"{v:.1f} KB", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("trunk cache, KB per example")
    ax.set_title(f"trunk cache per example (L={args.slices}, T={args.max_tokens}, {len(ids)} tweets)", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    fig.savefig(png)
    pyplot.close(fig)
    result["png"] = str(png)
    path = write_json(out, NAME, result)
    if not args.quiet:
        for k in LAYOUTS:
            r = rows[k]
            print(f"{k:9s} {r['bytes_per_example'] / 1000:7.1f} KB/example ({r['vs_legacy']:.2f}x legacy)"
                  + (f", max abs error {r['max_abs_error']:.2e}" if "max_abs_error" in r else ""))
        print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()

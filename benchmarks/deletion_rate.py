"""Benchmark 1: deletion rate, Monte-Carlo simulation vs the closed forms, for several (m, L, B) and selections.

Deletion rate = expected number of uniform deletion requests (over the m*L slices) until every shard
is dead, i.e. no sequence of any shard keeps a valid prefix. Closed forms (docs/formulas.md, "Deletion
rate"): S3T m*L*H(m*B') with B' the distinct first slices per shard; SISA with prefix fallback m*L*H(m);
SISA where any hit kills the shard m*H(m). The simulation runs the actual sequences the engine
selects (sequences.py) through the planner's valid-prefix rule, so it checks code and formula.
No model is trained: under a minute with the default grid.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import bar, base_parser, machine, plt, write_json

NAME = "deletion_rate"
# m=5, L=6, cyclic B=1..6: the approximate values printed in the S3T paper's table, as given in
# docs/formulas.md; plotted for comparison only (B=5, 6 differ from the formula, which the tests check).
PAPER_M5_L6 = [68.5, 87.6, 99.6, 107.8, 114.8, 120.9]


def budgets(selection: str, L: int) -> list[int]:
    if selection == "tree":
        import math

        return sorted({b for b in (L, L + 1, 2 * L, 3 * L) if b <= math.factorial(L)})
    return list(range(1, L + 1))


def simulate(perms, m: int, L: int, trials: int, seed: int, mode: str = "prefix", batches: int = 20) -> tuple[float, float]:
    """Mean and standard error over `batches` independent simulation batches."""
    from s3t_ops.deletion_rate import simulate_deletion_rate

    per = max(1, trials // batches)
    means = [simulate_deletion_rate(perms, m, L, trials=per, seed=seed + 1000 * b, mode=mode) for b in range(batches)]
    return float(np.mean(means)), float(np.std(means, ddof=1) / np.sqrt(batches)) if batches > 1 else 0.0


def run(ms: list[int], Ls: list[int], selections: list[str], trials: int, seed: int, quiet: bool) -> dict:
    from s3t_ops.deletion_rate import deletion_rate_closed_form, expected_best_prefix_single_deletion, sisa_kill_rate_closed_form
    from s3t_ops.sequences import select_sequences

    jobs = [(m, L, sel, B) for m in ms for L in Ls for sel in selections for B in budgets(sel, L)]
    rows, sisa = [], []
    with bar(len(jobs) + len(ms) * len(Ls), "deletion-rate configs", quiet) as pb:
        for m in ms:
            for L in Ls:
                kill, kill_se = simulate([], m, 1, trials, seed, mode="kill")
                prefix, prefix_se = simulate([tuple(range(L))], m, L, trials, seed)
                sisa.append({"m": m, "L": L,
                             "prefix_fallback": {"simulated": prefix, "stderr": prefix_se, "closed_form": deletion_rate_closed_form(m, L, 1)},
                             "kill": {"simulated": kill, "stderr": kill_se, "closed_form": sisa_kill_rate_closed_form(m)}})
                pb.update()
        for m, L, sel, B in jobs:
            perms = select_sequences(sel, L, B)
            b_prime = len({p[0] for p in perms})
            sim, se = simulate(perms, m, L, trials, seed)
            closed = deletion_rate_closed_form(m, L, b_prime)
            rows.append({"m": m, "L": L, "B": B, "selection": sel, "b_prime": b_prime, "simulated": sim, "stderr": se,
                         "closed_form": closed, "rel_error": (sim - closed) / closed,
                         "vs_sisa_prefix": sim / deletion_rate_closed_form(m, L, 1), "vs_sisa_kill": sim / sisa_kill_rate_closed_form(m),
                         "best_prefix_after_one_deletion": expected_best_prefix_single_deletion(perms, L)})
            pb.update()
    return {"rows": rows, "sisa": sisa}


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    rows = result["rows"]
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    ax = axes[0]
    m0, L0 = (5, 6) if any(r["m"] == 5 and r["L"] == 6 for r in rows) else (rows[0]["m"], rows[0]["L"])
    colors = {"cyclic": "tab:blue", "tree": "tab:green", "bms": "tab:purple"}
    for sel, c in colors.items():
        pts = sorted((r["B"], r["simulated"], r["stderr"], r["closed_form"]) for r in rows if (r["m"], r["L"], r["selection"]) == (m0, L0, sel))
        if not pts:
            continue
        b, sim, se, closed = zip(*pts)
        offset = {"cyclic": -0.1, "tree": 0.0, "bms": 0.1}[sel]
        ax.errorbar(np.array(b) + offset, sim, yerr=[2 * s for s in se], fmt="o", color=c, ms=4, label=f"{sel}: simulated")
        ax.plot(b, closed, "-", color=c, alpha=0.5, label=f"{sel}: m·L·H(m·B')")
    s = next(x for x in result["sisa"] if (x["m"], x["L"]) == (m0, L0))
    ax.axhline(s["prefix_fallback"]["closed_form"], ls="--", color="tab:orange", label="SISA, prefix fallback m·L·H(m)")
    ax.axhline(s["kill"]["closed_form"], ls=":", color="tab:red", label="SISA, any hit kills m·H(m)")
    if (m0, L0) == (5, 6):
        ax.plot(range(1, 7), PAPER_M5_L6, "kx", ms=8, label="S3T paper's table (approx.)")
    ax.set_xlabel("budget B (sequences per shard)")
    ax.set_ylabel("deletions until every shard is dead")
    ax.set_title(f"m={m0}, L={L0}")
    ax.legend(fontsize=7)
    ax = axes[1]
    for sel, c in colors.items():
        pts = [(r["closed_form"], r["simulated"]) for r in rows if r["selection"] == sel]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=12, color=c, label=sel)
    for key, c in (("prefix_fallback", "tab:orange"), ("kill", "tab:red")):
        x = [v[key]["closed_form"] for v in result["sisa"]]
        y = [v[key]["simulated"] for v in result["sisa"]]
        ax.scatter(x, y, s=14, marker="s", color=c, label=f"SISA {key.replace('_', ' ')}")
    lim = max(max(r["closed_form"] for r in rows), max(r["simulated"] for r in rows)) * 1.05
    ax.plot([0, lim], [0, lim], "k-", lw=0.6)
    ax.set_xlabel("closed form")
    ax.set_ylabel("simulated (mean)")
    ax.set_title("every (m, L, B, selection): simulation vs closed form")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--m", type=int, nargs="+", default=[3, 5, 10], help="shard counts")
    p.add_argument("--L", type=int, nargs="+", default=[3, 4, 6], help="slice counts")
    p.add_argument("--selections", nargs="+", default=["cyclic", "tree", "bms"], choices=["cyclic", "tree", "bms"],
                   help="sequence selections (bms with a uniform prior)")
    p.add_argument("--trials", type=int, default=20000, help="Monte-Carlo trials per configuration")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.m, args.L, args.trials = [3, 5], [3], 500
    t0 = time.perf_counter()
    result = run(args.m, args.L, args.selections, args.trials, args.seed, args.quiet)
    worst = max(abs(r["rel_error"]) for r in result["rows"])
    sisa_err = max(abs(v[k]["simulated"] - v[k]["closed_form"]) / v[k]["closed_form"] for v in result["sisa"] for k in ("prefix_fallback", "kill"))
    out = Path(args.out)
    png = out / f"{NAME}.png"
    out.mkdir(parents=True, exist_ok=True)
    plot(result, png)
    data = {"benchmark": NAME, "args": vars(args), "machine": machine(), "seconds": time.perf_counter() - t0,
            "max_abs_rel_error": worst, "max_abs_rel_error_sisa": sisa_err, **result, "png": str(png)}
    path = write_json(out, NAME, data)
    if not args.quiet:
        print(f"{len(result['rows'])} S3T configurations, {args.trials} trials each: worst |simulated - closed form| / closed form = {worst:.3%} "
              f"(SISA forms: {sisa_err:.3%})")
        for r in result["rows"]:
            if (r["m"], r["L"]) == (5, 6) and r["selection"] == "cyclic":
                print(f"  m=5 L=6 cyclic B={r['B']}: simulated {r['simulated']:.1f} ± {r['stderr']:.1f}, closed form {r['closed_form']:.1f}")
        print(f"wrote {path} and {png}")
    return data


if __name__ == "__main__":
    main()

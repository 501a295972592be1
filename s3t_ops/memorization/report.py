"""How an approximate-unlearning result reads: the text table `s3t unlearn` prints and the ToW figure.

Both doors show the same result this way; store.py writes the figure, service.py builds the result.
The ToW and ToW-MIA scores are those of docs/memorization.md, "## Metrics".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

APPROXIMATE_NOTE = ("APPROXIMATE unlearning: the unlearned model is a monolithic model whose weights may still carry "
                    "information about the forgotten examples; it is only scored against a model retrained without them "
                    "(the oracle). Unlike S3T's exact deletion (`s3t forget`), no guarantee holds. The S3T state "
                    "(ledger, checkpoints, served model) is unchanged.")


def figure(summary: dict[str, dict[str, dict[str, float]]], title: str) -> "Figure":
    """ToW and ToW-MIA per variant: mean with the 95% interval over seeds as error bars."""
    from matplotlib.figure import Figure

    names = [n for n, m in summary.items() if "tow" in m]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2), dpi=120)
    ax = fig.subplots()
    tow_bars(ax, summary, names)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("vs the retrained oracle (1 = identical)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tow_bars(ax: Any, summary: dict[str, dict[str, dict[str, float]]], names: list[str]) -> None:
    """ToW and ToW-MIA of the variants `names` as paired bars on `ax` (one tick per variant): the mean, with
    the interval of `metrics.summarize` as error bars."""
    for j, (metric, name) in enumerate((("tow", "ToW"), ("tow_mia", "ToW-MIA"))):
        means = [summary[n][metric]["mean"] for n in names]
        err = [[summary[n][metric]["mean"] - summary[n][metric]["low"] for n in names],
               [summary[n][metric]["high"] - summary[n][metric]["mean"] for n in names]]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], means, width=0.4, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(names)))


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report printed by `s3t unlearn`."""
    s = result["summary"]
    n = result["seeds"]
    lines = ["=" * 100, APPROXIMATE_NOTE, "=" * 100,
             f"method {result['method']} (proxy {result['proxy']}), forget set {result['n_forget']} of {result['n_train']} training "
             f"examples, {len(n)} seed(s) {n}" + ("; mean [95% interval]" if len(n) > 1 else "")]

    def cell(m: dict[str, float] | None, width: int) -> str:
        if not m or m["n"] == 0:
            return "-".rjust(width)
        text = f"{m['mean']:.3f}" + (f" [{m['low']:.3f}, {m['high']:.3f}]" if m["n"] > 1 else "")
        return text.rjust(width)

    w = 22 if len(n) > 1 else 11
    head = f"{'variant':16s}" + "".join(h.rjust(w) for h in ("acc forget", "acc retain", "acc test", "MIA", "ToW", "ToW-MIA"))
    lines += [head + "  seconds"]
    for name, m in s.items():
        lines.append(f"{name:16s}" + "".join(cell(m.get(k), w) for k in ("forget", "retain", "test", "mia", "tow", "tow_mia"))
                     + f"  {m['seconds']['mean']:7.1f}")
    primary = result["primary"]
    if "tow" in s.get(primary, {}):
        p, o = s[primary], s.get("original", {})
        lines.append(f"{primary}: ToW {p['tow']['mean']:.3f}, ToW-MIA {p['tow_mia']['mean']:.3f} vs doing nothing (original) "
                     f"ToW {o['tow']['mean']:.3f}, ToW-MIA {o['tow_mia']['mean']:.3f} (1 = indistinguishable from the oracle on these metrics)")
        best = max((k for k in s if "tow" in s[k]), key=lambda k: s[k]["tow"]["mean"])
        lines.append(f"closest to the oracle by mean ToW: {best}")
    else:
        lines.append("no oracle was trained (--no-oracle): accuracies and MIA only, nothing is scored")
    lines.append(f"report: {result['json']}" + (f"   plot: {result['png']}" if result.get("png") else ""))
    lines.append(f"unlearned model ({primary}, seed {n[0]}): {result['model']}")
    if result.get("mlflow"):
        lines.append(f"MLflow: {result['mlflow']['runs']} run(s) in experiment '{result['mlflow']['experiment']}' at {result['mlflow']['tracking_uri']} "
                     f"(tag s3t.unlearning_id={result['id']})")
    return "\n".join(lines)

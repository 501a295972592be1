"""Demo outputs people read: a JSON summary and a PNG of accuracy and served depth vs deletions."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_deletions(path: Path, rows: list[dict[str, Any]], retrained: dict[str, Any] | None, majority: float, L: int, m: int) -> Path:
    """Accuracy after each deletion (deactivation only) with the mean served depth; the retrained point on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    d = [r["deletions"] for r in rows]
    acc = [r["test_accuracy"] for r in rows]
    depth = [r["mean_depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(d, acc, "o-", color="tab:blue", label="S3T ensemble (no retraining)")
    if retrained:
        ax.plot([d[-1]], [retrained["test_accuracy"]], "*", ms=14, color="tab:green", label="after retraining affected stages")
    ax.axhline(majority, ls="--", color="grey", label=f"majority class ({majority:.3f})")
    ax.set_xlabel("deletion requests honoured")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"S3T: accuracy while honouring deletions (m={m} shards, L={L} slices)")
    ax2 = ax.twinx()
    ax2.step(d, depth, where="post", color="tab:orange", alpha=0.7, label="mean served depth")
    ax2.set_ylim(0, L + 0.2)
    ax2.set_ylabel("mean served depth (stages)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

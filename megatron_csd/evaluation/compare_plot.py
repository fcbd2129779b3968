"""The comparison plot: grouped bars (one per method) of ROUGE-L and response loss, error bars =
sample std over training seeds, each seed's student as a dot, the teacher as a dashed line."""
from __future__ import annotations

PLOT_METRICS = (("rougeL", "ROUGE-L (x100, higher is better)"),
                ("response_loss", "response loss (nats/token, lower is better)"))


def plot_comparison(report: dict, path: str) -> None:
    """Write ``report`` (``compare.aggregate``'s tree) as a PNG at ``path`` (must not exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4.2 * len(PLOT_METRICS), 3.6))
    for ax, (name, title) in zip(axes, PLOT_METRICS):
        stats = [report["methods"][m]["metrics"][name] for m in methods]
        xs = range(len(methods))
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        ax.bar(xs, means, yerr=errs, capsize=3, color="tab:blue", alpha=0.75)
        for x, s in zip(xs, stats):
            ax.plot([x] * len(s["per_seed"]), s["per_seed"], "k.", markersize=4)
        teacher = (report.get("teacher") or {}).get(name)
        if teacher is not None:
            ax.axhline(teacher, color="tab:red", linestyle="--", linewidth=1, label="teacher")
            ax.legend(fontsize=8, loc="best")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if name == "response_loss":
            values = [v for s in stats for v in s["per_seed"] if v is not None]
            values += [teacher] if teacher is not None else []
            if values:  # zoom in: the differences are small next to the loss itself
                span = max(values) - min(values) or 0.1
                ax.set_ylim(max(0.0, min(values) - 0.5 * span), max(values) + 0.5 * span)
    seeds = sorted({s for m in methods for s in report["methods"][m]["seeds"]})
    fig.suptitle(f"students over training seeds {', '.join(map(str, seeds))}"
                 + (" (PARTIAL)" if report.get("partial") else ""), fontsize=9)
    fig.tight_layout()
    with open(path, "xb") as handle:  # never overwrite
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)

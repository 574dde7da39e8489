"""The suite's two plot kinds, drawn from the points `timing.measure` returns (medians + spreads).

    latency_vs_throughput: one line per series, x = throughput, y = latency percentiles
                           (p50 solid, p99 dashed), error bars = the repeats' [min, max]
    recall_vs_latency:     one line per series, x = latency, y = recall@N against exact

Any stage (the end-to-end and peer stages included) calls these with its own points.
"""

from __future__ import annotations

from typing import Sequence


def new_figure(n_panels: int, *, width: float = 6.0, height: float = 4.5, cols: int = 2):
    """An off-screen figure with `n_panels` axes (a flat list), laid out in up to `cols` columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, n_panels))
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _plain_minor_ticks(ax) -> None:
    """No labels on log-scale minor ticks (they crowd the axis); major decades stay labelled."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _err(point: dict, key: str) -> tuple[float, float]:
    lo, hi = point.get(f"{key}_spread", [point[key], point[key]])
    return max(point[key] - lo, 0.0), max(hi - point[key], 0.0)


def _errorbar(ax, points: Sequence[dict], xkey: str, ykey: str, **style):
    xs = [p[xkey] for p in points]
    ys = [p[ykey] for p in points]
    xerr = list(zip(*[_err(p, xkey) for p in points]))
    yerr = list(zip(*[_err(p, ykey) for p in points]))
    return ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, capsize=2, **style)


def latency_vs_throughput(
    ax,
    series: dict[str, Sequence[dict]],
    *,
    throughput_key: str = "items_per_s",
    percentiles: Sequence[str] = ("p50", "p99"),
    labels_key: str | None = None,
    title: str = "",
    xlabel: str = "throughput (items/s)",
    log_y: bool = True,
) -> None:
    """Latency percentiles (ms) against throughput, one colour per series, one line style per percentile.

    `labels_key` names a field of each point to write beside its p50 marker (e.g. batch size
    or concurrency), so the load level of each point can be read off the plot.
    """
    styles = ["-", "--", ":", "-."]
    for ci, (name, points) in enumerate(series.items()):
        if not points:
            continue
        colour = f"C{ci}"
        for pi, pct in enumerate(percentiles):
            _errorbar(
                ax,
                points,
                throughput_key,
                f"{pct}_ms",
                color=colour,
                linestyle=styles[pi % len(styles)],
                marker="o" if pi == 0 else "x",
                markersize=4,
                label=f"{name} {pct}",
            )
        if labels_key:
            for p in points:
                ax.annotate(
                    str(p[labels_key]),
                    (p[throughput_key], p[f"{percentiles[0]}_ms"]),
                    fontsize=7,
                    color=colour,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    _plain_minor_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def recall_vs_latency(
    ax,
    series: dict[str, Sequence[dict]],
    *,
    latency_key: str = "single_p50_ms",
    recall_key: str = "recall",
    labels_key: str | None = None,
    title: str = "",
    xlabel: str = "latency (ms)",
) -> None:
    """Recall (0..1) against latency, one line per series (e.g. one index type), points in sweep order."""
    for ci, (name, points) in enumerate(series.items()):
        if not points:
            continue
        _errorbar(ax, points, latency_key, recall_key, color=f"C{ci}", marker="o", markersize=4, label=name)
        if labels_key:
            for p in points:
                if p.get(labels_key) is not None:
                    ax.annotate(
                        str(p[labels_key]),
                        (p[latency_key], p[recall_key]),
                        fontsize=7,
                        xytext=(3, -8),
                        textcoords="offset points",
                    )
    ax.set_xscale("log")
    _plain_minor_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("recall")
    ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

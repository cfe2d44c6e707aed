"""The one Markdown-table helper and the plot helpers every report uses (results, eval, compare)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are ``str()``-ed as given (format numbers before)."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_axes(ax, labels: Sequence[str], groups: dict[str, Sequence[float]], value_labels: bool = False) -> None:
    """Grouped bars on ``ax``: one bar per label and group (``groups``: legend name -> values per label)."""
    width = 0.8 / max(len(groups), 1)
    for i, (name, values) in enumerate(groups.items()):
        bars = ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
        if value_labels:
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(labels))], labels, rotation=20, ha="right",
                  fontsize=8)  # fmt: skip


def plain_log_y(ax) -> None:
    """Log y labelled with plain numbers (16.3, not 1.63 x 10^1). Within a decade the log locator has too few
    ticks (none between 10 and 20: a panel spanning 9-14 shows two), so there plain evenly spaced ticks stand
    in; over a decade or more only some minor ticks (2, 3, 5 x 10^k) are labelled. Call it after drawing."""
    from matplotlib.ticker import LogFormatter, MaxNLocator, NullLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    low, high = ax.get_ylim()
    if high < 10 * low:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def figure(panels: int, width_per_panel: float, path: Path, draw, legend_rows: int = 0) -> Path | None:
    """A row of ``panels`` axes, filled by ``draw(axes)``, saved to ``path`` (None without matplotlib);
    ``legend_rows`` reserves room below the panels for a figure legend that ``draw`` puts there."""
    plt = _pyplot()
    if plt is None:
        return None
    legend_height = 0.25 * legend_rows  # inches
    height = 4 + legend_height
    fig, axes = plt.subplots(1, panels, figsize=(max(4.0, width_per_panel * panels), height), squeeze=False)
    draw(list(axes[0]))
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(series: list[tuple[str, dict[str, tuple[list, list]], dict[str, float]]], xlabel: str, ylabel: str,
              path: Path) -> Path | None:  # fmt: skip
    """One panel per ``(title, {line name: (xs, ys)}, {reference name: y})``; log y, the references as
    horizontal lines (the first dashed: float; the others dotted: e.g. an untrained start)."""

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    entries = len(series[0][1]) + len(series[0][2]) if series else 0  # legend entries: lines + references
    columns = max(1, min(3, entries))

    def draw(axes):
        for ax, (title, lines, refs) in zip(axes, series):
            for name, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker="o", label=name)
            for i, (name, y) in enumerate(refs.items()):
                ax.axhline(y, color="gray" if i == 0 else f"C{len(lines) + i}", linestyle="--" if i == 0 else ":",
                           linewidth=1, label=name)  # fmt: skip
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log")
            plain_log_y(ax)
            ax.set_xticks(sorted({x for xs, _ in lines.values() for x in xs}))  # the evaluated steps, plain
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        # every panel has the same lines: one legend under the row, not one over each panel's data
        handles, labels = axes[0].get_legend_handles_labels()
        axes[0].figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)

    return figure(len(series), 4.5, path, draw, legend_rows=-(-entries // columns))

"""trainer.report's figure: every run's val top-5 per epoch in one plot, each run's best epoch marked.

matplotlib's object API with the Agg renderer, never pyplot: no display is needed, and no global
figure state is shared with a caller that draws figures of its own.
"""
from __future__ import annotations

import io
import logging

from .report import FINISHED, Run, sort

log = logging.getLogger("trainer.report")

SIZE_INCHES, DPI = (9, 5.5), 100
# The legend sits right of the axes, one column per LEGEND_ROWS runs; the figure grows to hold it.
LEGEND_WIDTH_INCHES, LEGEND_ROWS, LEGEND_ROW_INCHES = 2.5, 30, 0.2
MARKERS = (".", "o", "s", "^", "v", "D", "P", "X")


def colours(count: int) -> list:
    """`count` distinct colours: matplotlib's tab10 or tab20 while they suffice, else evenly spaced on turbo."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def figure_size(curves: int) -> tuple[float, float]:
    """Wide enough for the legend's columns, tall enough for its rows."""
    columns = max(1, -(-curves // LEGEND_ROWS))
    rows = -(-curves // columns)
    return (SIZE_INCHES[0] + LEGEND_WIDTH_INCHES * columns,
            max(SIZE_INCHES[1], 1.5 + LEGEND_ROW_INCHES * rows))


def plot(runs: list[Run]) -> bytes:
    """The PNG, runs in the table's order (best first) so that the legend reads like the table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = [run for run in sort(runs) if run.history]
    for run in sort(runs):
        if not run.history:
            log.info("%s: no epoch yet, no curve", run.row["run_id"])
    figure = Figure(figsize=figure_size(len(drawn)) if drawn else SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (run, colour) in enumerate(zip(drawn, colours(len(drawn)))):
        _curve(axes, run, colour, MARKERS[index % len(MARKERS)])
    axes.set(title="Validation top-5 accuracy per epoch (\u2605: each run's best epoch)", xlabel="epoch (from 0)",
             ylabel="val top-5 accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if drawn:
        figure.legend(loc="outside right upper", fontsize="small", ncols=max(1, -(-len(drawn) // LEGEND_ROWS)))
    else:
        axes.text(0.5, 0.5, "no run has finished an epoch yet", ha="center", va="center", transform=axes.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _curve(axes, run: Run, colour, marker: str) -> None:
    row = run.row
    epochs = [epoch["epoch"] for epoch in run.history]
    label = row["run_id"] + ("" if row["status"] == FINISHED else f" ({row['status']})")
    # An unfinished run dashed: its curve may still rise.
    axes.plot(epochs, [epoch["val_top5"] for epoch in run.history], marker=marker, markersize=4,
              label=label, color=colour, linestyle="-" if row["status"] == FINISHED else "--")
    if row["best_epoch"] is not None:
        axes.plot([row["best_epoch"]], [row["val_top5"]], marker="*", markersize=12, color=colour)

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


def plot(runs: list[Run]) -> bytes:
    """The PNG, runs in the table's order (best first) so that the legend reads like the table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in sort(runs):
        _curve(axes, run)
    axes.set(title="Validation top-5 accuracy per epoch (\u2605: each run's best epoch)", xlabel="epoch (from 0)",
             ylabel="val top-5 accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower right", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no run has finished an epoch yet", ha="center", va="center", transform=axes.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _curve(axes, run: Run) -> None:
    row = run.row
    if not run.history:
        log.info("%s: no epoch yet, no curve", row["run_id"])
        return
    epochs = [epoch["epoch"] for epoch in run.history]
    label = row["run_id"] + ("" if row["status"] == FINISHED else f" ({row['status']})")
    # An unfinished run dashed: its curve may still rise.
    (line,) = axes.plot(epochs, [epoch["val_top5"] for epoch in run.history], marker=".", label=label,
                        linestyle="-" if row["status"] == FINISHED else "--")
    if row["best_epoch"] is not None:
        axes.plot([row["best_epoch"]], [row["val_top5"]], marker="*", markersize=12, color=line.get_color())

"""`<output>/curves.png`: a run's learning curves, drawn again by rank 0 after every epoch.

Three panels over the epochs (from 0, as in history.csv): the training loss; top-1 and top-5 accuracy,
train (dashed) against val (solid), the gap the study read overfitting from. The best epoch (results.json's:
the highest val top-5, ties broken by top-1) is a dotted line across the panels and a star on the val
curves. matplotlib's object API with the Agg renderer, as trainer.report_plot: no display, no pyplot state.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

from ingest.storage import write_atomic

if TYPE_CHECKING:
    from .checkpoint import Progress

NAME = "curves.png"
SIZE_INCHES, DPI = (13, 4.5), 100
TRAIN_STYLE, VAL_STYLE = {"color": "C0", "linestyle": "--"}, {"color": "C1", "linestyle": "-"}


def write(fs, root: str, progress: Progress) -> None:
    """Rank 0, at the end of an epoch: the figure of the history so far into the output."""
    write_atomic(fs, f"{root}/{NAME}", draw(progress))


def draw(progress: Progress) -> bytes:
    """The PNG of `progress`'s history (at least one epoch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history, best = progress.history, progress.best
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    loss, top1, top5 = figure.subplots(1, 3)
    epochs = [result.epoch for result in history]
    loss.plot(epochs, [result.loss for result in history], marker=".", label="train", **TRAIN_STYLE)
    loss.set(title="loss", ylabel="mean training loss")
    for axes, k in ((top1, 1), (top5, 5)):
        axes.plot(epochs, [getattr(result, f"train_top{k}") for result in history], marker=".", label="train",
                  **TRAIN_STYLE)
        axes.plot(epochs, [getattr(result, f"val_top{k}") for result in history], marker=".", label="val",
                  **VAL_STYLE)
        axes.plot([best.epoch], [getattr(best, f"val_top{k}")], marker="*", markersize=14, color=VAL_STYLE["color"])
        axes.set(title=f"top-{k} accuracy", ylabel="accuracy")
    for axes in (loss, top1, top5):
        axes.axvline(best.epoch, color="grey", linestyle=":", label=f"best epoch ({best.epoch})")
        axes.set(xlabel="epoch (from 0)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"{len(history)} epochs; best epoch {best.epoch}: val top-1 {best.val_top1:.4f}, "
                    f"top-5 {best.val_top5:.4f}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

"""`trainer.train --katib-metrics`: metrics for Kubeflow Katib's StdOut collector (the chart's sweeps).

Rank 0 prints one line per epoch and, last, the run's result, each `name=value` pair in the form of Katib's
default metrics filter and each line starting with its time in RFC 3339, which Katib takes as the values'
timestamp. The chart's Experiment reads val_top5 (the objective) and val_top1 by their latest value: the
last line, the best epoch's as in results.json, whatever epochs an earlier attempt of the trial ran (Katib
keeps only the metrics of the pod 0 that finished the trial).
"""
from __future__ import annotations

import datetime

OBJECTIVE = "val_top5"
ADDITIONAL = ("val_top1",)


def line(**values: float) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # repr of a Python int or float (never numpy's, which names its type): the shortest text that reads back as
    # the same number, which the filter's number pattern matches.
    return " ".join([stamp, *(f"{name}={value if isinstance(value, int) else float(value)!r}"
                              for name, value in values.items())])


def print_epoch(result) -> None:
    """An epoch of trainer.loop's EpochResult (its number counts from 0, as in history.csv)."""
    print(line(epoch=result.epoch, loss=result.loss, train_top1=result.train_top1, train_top5=result.train_top5,
               val_top1=result.val_top1, val_top5=result.val_top5), flush=True)


def print_result(results: dict) -> None:
    """The run's result (results.json): the best epoch's accuracies."""
    print(line(best_epoch=results["best_epoch"], train_top1=results["train_top1"], train_top5=results["train_top5"],
               val_top1=results["val_top1"], val_top5=results["val_top5"]), flush=True)

"""What a run leaves for its user besides the model: `history.csv`, rewritten after every epoch
(kept across resume: the history is part of the checkpoint), and `results.json` at the end.
Every field is described in docs/training.md."""
from __future__ import annotations

import csv
import io

from .checkpoint import Progress
from .config import TrainConfig
from .models import dropout_rates

# Keras' CSVLogger conventions: a header row, one row per epoch, "epoch" first.
HISTORY_COLUMNS = ("epoch", "loss", "train_top1", "train_top5", "val_top1", "val_top5", "learning_rate",
                   "images_per_second", "data_wait_share", "seconds", "val_samples_seen", "val_samples_expected")


def history_csv(progress: Progress) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for result in progress.history:
        writer.writerow([getattr(result, column) for column in HISTORY_COLUMNS])
    return text.getvalue().encode()


def results(config: TrainConfig, progress: Progress, model, workers: int, start_epoch: int) -> dict:
    """The run's row of the study's table: the best epoch's accuracies and how the run went."""
    best, history = progress.best, progress.history
    return {
        "model": config.model.name, "dropout": dropout_rates(model), "augmentation": config.augment.enabled,
        "train_top1": best.train_top1, "train_top5": best.train_top5,
        "val_top1": best.val_top1, "val_top5": best.val_top5, "best_epoch": best.epoch,
        "val_samples_seen": best.val_samples_seen, "val_samples_expected": best.val_samples_expected,
        "val_exact": best.val_samples_seen == best.val_samples_expected,
        "epochs_run": len(history), "stopped_early": progress.stopped_early, "start_epoch": start_epoch,
        "workers": workers, "seed": config.seed, "deterministic": config.deterministic,
        "images_per_second": sum(r.images_per_second for r in history) / len(history) * workers,
        "data_wait_share": sum(r.data_wait_share for r in history) / len(history),
    }

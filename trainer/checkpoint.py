"""Checkpoints at any fsspec URL, with the ingest's commit protocol: the state file is written
atomically first, then `checkpoints/latest.json` names it. A checkpoint interrupted mid-write
is never named, so never used for resume.

State: every model variable (BatchNorm statistics included), every optimizer variable (moments,
iteration count: the LR schedule continues), the best weights so far (early stopping keeps them),
and the epoch history.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from ingest.storage import dump_json, write_atomic

from .loop import EpochResult, Trainer

log = logging.getLogger(__name__)

DIRECTORY = "checkpoints"
LATEST = f"{DIRECTORY}/latest.json"
KEEP = 2   # state files kept: the named one and the one before


@dataclass
class Progress:
    """Where training stands: what resume restores besides the variables."""

    next_epoch: int = 0
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None
    best_weights: list[np.ndarray] | None = None
    stopped_early: bool = False

    @property
    def best(self) -> EpochResult | None:
        return None if self.best_epoch is None else next(r for r in self.history if r.epoch == self.best_epoch)

    def record(self, result: EpochResult, weights: list[np.ndarray]) -> int:
        """Add an epoch; returns the epochs since the best val top-5."""
        self.history.append(result)
        self.next_epoch = result.epoch + 1
        # Best = highest val top-5, ties (top-5 saturates early on easy data) broken by top-1.
        if self.best is None or (result.val_top5, result.val_top1) > (self.best.val_top5, self.best.val_top1):
            self.best_epoch, self.best_weights = result.epoch, weights
        return result.epoch - self.best_epoch


def save(fs, root: str, trainer: Trainer, progress: Progress) -> None:
    """Rank 0 only. State file first, then the pointer to it."""
    arrays = {f"model_{i}": w for i, w in enumerate(trainer.model.get_weights())}
    arrays |= {f"optimizer_{i}": np.asarray(v.value) for i, v in enumerate(trainer.optimizer.variables)}
    arrays |= {f"best_{i}": w for i, w in enumerate(progress.best_weights or [])}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    name = f"{DIRECTORY}/epoch-{progress.next_epoch - 1:04d}.npz"
    write_atomic(fs, f"{root}/{name}", buffer.getvalue())
    write_atomic(fs, f"{root}/{LATEST}", dump_json({
        "state": name, "next_epoch": progress.next_epoch, "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early, "history": [asdict(r) for r in progress.history]}))
    _prune(fs, root, keep=name)


def _prune(fs, root: str, keep: str) -> None:
    states = sorted(p for p in fs.ls(f"{root}/{DIRECTORY}", detail=False) if p.endswith(".npz"))
    for path in states[:-KEEP]:
        if not path.endswith(keep):
            fs.rm_file(path)


def restore(fs, root: str, trainer: Trainer) -> Progress:
    """Every rank: load the named checkpoint into the trainer, or start fresh when there is none."""
    if not fs.isfile(f"{root}/{LATEST}"):
        return Progress()
    latest = json.loads(fs.cat_file(f"{root}/{LATEST}"))
    with np.load(io.BytesIO(fs.cat_file(f"{root}/{latest['state']}"))) as state:
        trainer.model.set_weights(_series(state, "model"))
        for variable, value in zip(trainer.optimizer.variables, _series(state, "optimizer")):
            variable.assign(value)
        best_weights = _series(state, "best") or None
    history = [EpochResult(**r) for r in latest["history"]]
    log.info("resuming from %s: epoch %d", latest["state"], latest["next_epoch"])
    return Progress(latest["next_epoch"], history, latest["best_epoch"], best_weights, latest["stopped_early"])


def _series(state, prefix: str) -> list[np.ndarray]:
    count = sum(1 for key in state.files if key.startswith(f"{prefix}_"))
    return [state[f"{prefix}_{i}"] for i in range(count)]

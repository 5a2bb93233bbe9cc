"""Checkpoints at any fsspec URL, with the ingest's commit protocol: the state file is written
atomically first, then `checkpoints/latest.json` names it. A checkpoint interrupted mid-write
is never named, so never used for resume.

The state is everything that shapes the next epoch: every model weight (BatchNorm statistics
included), every optimizer variable (moments, iteration count: the LR schedule continues), every
rank's random state (dropout's seed generators, gathered to rank 0), the best weights so far and
the early-stopping state, the epoch history, and the config and worker count it was made with.
The data position needs no state: an epoch is one pass over each rank's share, determined by
(seed, rank, epoch) (trainer.data).

Restore on rank 0, then broadcast, as Horovod's examples do: rank 0 reads the checkpoint and checks
that the rerun's settings match it; the others receive the progress, their random state and the
variables from rank 0, so ranks never start at different epochs, whatever storage each one sees.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ingest.storage import dump_json, write_atomic

from . import dist, randomness
from ingest.errors import EXIT_FAILED, IngestError

from .errors import ConfigMismatch, RestoreFailed
from .loop import EpochResult, Partial, Trainer

log = logging.getLogger(__name__)

DIRECTORY = "checkpoints"
LATEST = f"{DIRECTORY}/latest.json"
KEEP = 2   # state files kept: the named one and the one before
# What --restart removes: the checkpoints and everything a finished run leaves.
RUN_FILES = ("results.json", "model.keras", "saved_model", "classes.json", "history.csv", "curves.png")


@dataclass
class Progress:
    """Where training stands: what resume restores besides the variables."""

    next_epoch: int = 0
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None
    best_weights: list[np.ndarray] | None = None   # rank 0 only: it saves the model
    stopped_early: bool = False
    partial: Partial | None = None                  # of epoch next_epoch, when checkpointed mid-epoch
    saved_at: float | None = None                   # Unix time of the checkpoint restored

    @property
    def best(self) -> EpochResult | None:
        return None if self.best_epoch is None else next(r for r in self.history if r.epoch == self.best_epoch)

    @property
    def stale(self) -> int:
        """Epochs since the best val top-5."""
        return self.history[-1].epoch - self.best_epoch if self.history else 0

    def record(self, result: EpochResult) -> bool:
        """Add an epoch; True when it is the new best."""
        self.history.append(result)
        self.next_epoch, self.partial = result.epoch + 1, None
        # Best = highest val top-5, ties (top-5 saturates early on easy data) broken by top-1.
        if self.best is None or (result.val_top5, result.val_top1) > (self.best.val_top5, self.best.val_top1):
            self.best_epoch = result.epoch
            return True
        return False


def save(fs, root: str, trainer: Trainer, progress: Progress, seed_states: np.ndarray) -> None:
    """Rank 0 only (`seed_states`: every rank's, from dist.gather). State file first, then the pointer.
    With `progress.partial`, a mid-epoch checkpoint of epoch `progress.next_epoch`."""
    arrays = {f"model_{i}": w for i, w in enumerate(trainer.model.get_weights())}
    arrays |= {f"optimizer_{i}": np.asarray(v.value) for i, v in enumerate(trainer.optimizer.variables)}
    arrays |= {f"best_{i}": w for i, w in enumerate(progress.best_weights or [])}
    arrays["seed_states"] = seed_states
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    partial = progress.partial
    # Sorted by name in the order they are made: epoch-0003-step-000120 before epoch-0003 (its end).
    name = (f"{DIRECTORY}/epoch-{progress.next_epoch:04d}-step-{partial.step:06d}.npz" if partial
            else f"{DIRECTORY}/epoch-{progress.next_epoch - 1:04d}.npz")
    write_atomic(fs, f"{root}/{name}", buffer.getvalue())
    write_atomic(fs, f"{root}/{LATEST}", dump_json({
        "state": name, "next_epoch": progress.next_epoch, "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early, "history": [asdict(r) for r in progress.history],
        "config": trainer.config.to_json(), "workers": trainer.workers.size,
        "dataset": trainer.data.manifest.get("plan_id"), "partial": asdict(partial) if partial else None,
        "saved_at": time.time()}))
    _prune(fs, root, keep=name)


def _prune(fs, root: str, keep: str) -> None:
    states = sorted(p for p in fs.ls(f"{root}/{DIRECTORY}", detail=False) if p.endswith(".npz"))
    for path in states[:-KEEP]:
        if not path.endswith(keep):
            fs.rm_file(path)


def restore(fs, root: str, trainer: Trainer, restart: bool = False) -> Progress:
    """Every rank: rank 0 loads the named checkpoint (or starts fresh when there is none, or when
    `restart`), then every rank takes rank 0's variables, progress and its own random state."""
    shared, best_weights = None, None
    if trainer.workers.is_chief:
        try:
            if restart:
                _clear(fs, root)
            shared = _load(fs, root, trainer)
        except Exception as exc:   # the other ranks stop with the same message and exit code
            message = str(exc) if isinstance(exc, IngestError) else f"rank 0 could not restore the checkpoint: {exc}"
            dist.broadcast_object({"error": message, "exit_code": getattr(exc, "exit_code", EXIT_FAILED)},
                                  "checkpoint")
            raise
        best_weights = shared.pop("best_weights") if shared else None   # only rank 0 saves the model
    shared = dist.broadcast_object(shared, "checkpoint")
    if shared and "error" in shared:
        raise RestoreFailed(shared["error"], shared["exit_code"])
    trainer.broadcast()
    if not shared:
        return Progress()
    seed_states = shared.pop("seed_states")
    if seed_states is not None:
        randomness.set_states(trainer.model, seed_states[trainer.workers.rank])
    return Progress(**shared, best_weights=best_weights)


def _clear(fs, root: str) -> None:
    if fs.isdir(f"{root}/{DIRECTORY}"):
        fs.rm(f"{root}/{DIRECTORY}", recursive=True)
    for name in RUN_FILES:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)   # saved_model is a folder
    log.info("--restart: removed the previous run's checkpoints and results from %s", root)


def _load(fs, root: str, trainer: Trainer) -> dict | None:
    """Rank 0: the checkpoint's progress, with the variables loaded into the trainer; None if none."""
    if not fs.isfile(f"{root}/{LATEST}"):
        return None
    latest = json.loads(fs.cat_file(f"{root}/{LATEST}"))
    _check_compatible(fs, root, latest, trainer)
    with np.load(io.BytesIO(fs.cat_file(f"{root}/{latest['state']}"))) as state:
        trainer.model.set_weights(_series(state, "model"))
        for variable, value in zip(trainer.optimizer.variables, _series(state, "optimizer"), strict=True):
            variable.assign(value)
        best_weights = _series(state, "best") or None
        seed_states = state["seed_states"] if "seed_states" in state.files else None
    log.info("resuming from %s: epoch %d%s", latest["state"], latest["next_epoch"],
             f", step {latest['partial']['step']}" if latest.get("partial") else "")
    return {"next_epoch": latest["next_epoch"], "history": [EpochResult(**r) for r in latest["history"]],
            "best_epoch": latest["best_epoch"], "stopped_early": latest["stopped_early"],
            "best_weights": best_weights, "seed_states": seed_states,
            "partial": Partial(**latest["partial"]) if latest.get("partial") else None,
            "saved_at": latest.get("saved_at")}


def _check_compatible(fs, root: str, latest: dict, trainer: Trainer) -> None:
    """Refuse to resume a run under different settings: one line naming each difference."""
    saved = latest.get("config") or json.loads(fs.cat_file(f"{root}/config.json"))
    differences = trainer.config.differences(saved)
    if latest.get("workers", trainer.workers.size) != trainer.workers.size:
        differences.append(f"workers {latest['workers']} -> {trainer.workers.size}")
    # --data may be spelt otherwise or moved (another bucket): the dataset is what must not change.
    dataset = trainer.data.manifest.get("plan_id")
    if latest.get("dataset", dataset) != dataset:
        differences.append(f"dataset {latest['dataset']} -> {dataset} (the manifests' plan ids)")
    if differences:
        raise ConfigMismatch(f"{trainer.config.output} holds a run made with other settings ({'; '.join(differences)}); "
                             f"rerun with its settings to resume it, or add --restart to start over")


def _series(state, prefix: str) -> list[np.ndarray]:
    count = sum(1 for key in state.files if key.startswith(f"{prefix}_"))
    return [state[f"{prefix}_{i}"] for i in range(count)]

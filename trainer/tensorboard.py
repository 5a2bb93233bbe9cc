"""A run's TensorBoard event files, written by rank 0: `<output>/tensorboard/train/` and `.../validation/`.

Scalars, named as Keras' TensorBoard callback names them so that a run reads like a Keras one:

- every epoch, at step = the epoch (from 0, as in history.csv), its history.csv values: train/ `epoch_loss`,
  `epoch_top1`, `epoch_top5`, `epoch_learning_rate`, `epoch_images_per_second` (one rank's),
  `epoch_data_wait_share`; validation/ `epoch_top1`, `epoch_top5`;
- every `--log-every-steps` steps, at the global step epoch x steps_per_epoch + step: train/ `batch_loss` (the
  step's loss, averaged over the ranks) and `batch_learning_rate` (the rate the step used).

TensorFlow writes the files on a local disk: into the output itself when it is a local path, else into a
temporary directory whose changed files are uploaded through fsspec (TensorFlow has no S3 filesystem here).
`sync` runs at every checkpoint, before it is written, so the events up to a checkpoint are in the output
whenever the checkpoint is: a rerun loses none. The events after it, which the rerun does again, are
removed from the earlier attempts' files when the rerun starts (each attempt writes its own files and
TensorBoard reads every file of a directory): none is doubled.

Written with `tf.summary.write` and the metadata of TensorBoard's scalar plugin, as `tf.summary.scalar`
writes them: that function needs the tensorboard package, which a training image need not hold.
"""
from __future__ import annotations

import logging
import os
import struct
import tempfile
import uuid
from collections.abc import Iterator

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

from ingest.storage import display, is_local, storage_call, write_atomic

from . import optim
from .checkpoint import Progress
from .loop import EpochResult, Trainer

log = logging.getLogger(__name__)

DIRECTORY = "tensorboard"
TRAIN, VALIDATION = "train", "validation"
# Per TensorBoard run (directory): tag -> history.csv column.
EPOCH_TAGS = {
    TRAIN: {"epoch_loss": "loss", "epoch_top1": "train_top1", "epoch_top5": "train_top5",
            "epoch_learning_rate": "learning_rate", "epoch_images_per_second": "images_per_second",
            "epoch_data_wait_share": "data_wait_share"},
    VALIDATION: {"epoch_top1": "val_top1", "epoch_top5": "val_top5"},
}
STEP_LOSS, STEP_RATE = "batch_loss", "batch_learning_rate"
SCALAR = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class EventLog:
    """Rank 0's event files for this attempt of the run at `fs`, `root`, which resumes at `progress`."""

    def __init__(self, fs, root: str, trainer: Trainer, progress: Progress):
        self.fs, self.remote = fs, f"{root}/{DIRECTORY}"
        self.steps_per_epoch = trainer.steps_per_epoch
        # The optimizer's schedule, built again: the rate of any iteration, not only of the current one.
        self.schedule = optim.build_schedule(trainer.config, trainer.workers.size, trainer.steps_per_epoch)
        resume_step = progress.next_epoch * self.steps_per_epoch + (progress.partial.step if progress.partial else 0)
        self.written = _drop_redone(fs, self.remote, progress.next_epoch, resume_step)   # epochs in the files
        self.temporary = None if is_local(fs) else tempfile.TemporaryDirectory(prefix="trainer-tensorboard-")
        self.local = self.remote if self.temporary is None else self.temporary.name
        suffix = f".{uuid.uuid4().hex[:8]}.v2"   # this attempt's own files, whatever its host name, pid and second
        self.writers = {run: tf.summary.create_file_writer(os.path.join(self.local, run), filename_suffix=suffix)
                        for run in EPOCH_TAGS}
        self.uploaded: dict[str, int] = {}   # run/file -> its size when uploaded

    def step(self, at: int, iteration: int, loss: float) -> None:
        """Trainer.on_step: a step's loss and the rate of its optimizer iteration, at global step `at`."""
        with self.writers[TRAIN].as_default():
            _scalar(STEP_LOSS, loss, at)
            _scalar(STEP_RATE, self.schedule(iteration), at)

    def sync(self, progress: Progress) -> None:
        """At every checkpoint, before it is written: the epochs not in the files yet (all of `progress`'s
        history: a resumed run's files may lack some), then the files into the output."""
        for result in progress.history:
            self._write_epoch(result)
        for writer in self.writers.values():
            writer.flush()
        if self.temporary:
            self._upload()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.temporary:
            self.temporary.cleanup()

    def _write_epoch(self, result: EpochResult) -> None:
        for run, tags in EPOCH_TAGS.items():
            if result.epoch not in self.written[run]:
                with self.writers[run].as_default():
                    for tag, column in tags.items():
                        _scalar(tag, getattr(result, column), result.epoch)
                self.written[run].add(result.epoch)

    def _upload(self) -> None:
        """The files that grew since their last upload, whole: object stores have no append."""
        for run in EPOCH_TAGS:
            directory = os.path.join(self.local, run)
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
                relative, local = f"{run}/{name}", os.path.join(directory, name)
                size = os.path.getsize(local)
                if self.uploaded.get(relative) != size:
                    with open(local, "rb") as handle:
                        write_atomic(self.fs, f"{self.remote}/{relative}", handle.read())
                    self.uploaded[relative] = size


def _scalar(tag: str, value, step: int) -> None:
    tf.summary.write(tag, tf.cast(value, tf.float32), step=step, metadata=SCALAR)


def _drop_redone(fs, remote: str, next_epoch: int, next_step: int) -> dict[str, set[int]]:
    """Remove from the earlier attempts' files the events this attempt writes again: epochs from
    `next_epoch` on, steps from `next_step` on (and a record cut short by a kill). A file left with no
    event is removed. Returns the epochs each run's files still hold."""
    epochs: dict[str, set[int]] = {run: set() for run in EPOCH_TAGS}
    with storage_call(fs, remote, "read"):
        paths = fs.find(remote) if fs.isdir(remote) else []
    for path in paths:
        run, _, name = path[len(remote) + 1:].partition("/")
        if run not in epochs or "tfevents" not in name:
            continue
        with storage_call(fs, path, "read"):
            data = fs.cat_file(path)
        kept, held, events = _kept(data, next_epoch, next_step)
        epochs[run] |= held
        if len(kept) == len(data):
            continue
        if events:
            write_atomic(fs, path, kept)
        else:
            with storage_call(fs, path, "write"):
                fs.rm_file(path)
        log.info("%s: removed the events from epoch %d, step %d on (the run goes on from there)",
                 display(fs, path), next_epoch, next_step)
    return epochs


def _kept(data: bytes, next_epoch: int, next_step: int) -> tuple[bytes, set[int], int]:
    """An event file's records before the resume point, the epochs they hold and how many scalars."""
    kept, epochs, scalars = [], set(), 0
    for framed, event in _events(data):
        tags = [value.tag for value in event.summary.value]
        if tags:   # else the file's header (its version)
            per_epoch = tags[0].startswith("epoch_")
            if event.step >= (next_epoch if per_epoch else next_step):
                continue
            scalars += 1
            if per_epoch:
                epochs.add(event.step)
        kept.append(framed)
    return b"".join(kept), epochs, scalars


def _events(data: bytes) -> Iterator[tuple[bytes, event_pb2.Event]]:
    """(record as framed, event) of an event file, a TFRecord file: length (8 bytes), its CRC (4), the
    event, its CRC (4). Ends at a record cut short or unreadable (a writer killed mid-write)."""
    position = 0
    while position + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        end = position + 12 + length + 4
        if end > len(data):
            return
        try:
            event = event_pb2.Event.FromString(data[position + 12:end - 4])
        except DecodeError:
            return
        yield data[position:end], event
        position = end

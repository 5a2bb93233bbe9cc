"""Manifest -> this rank's shards -> tf.data: stream, shuffle, decode + augment in parallel, batch.

Epoch e: every rank computes the same seeded permutation of the split's shards and takes
`shards[rank::size]`. With fewer shards than ranks, the ranks share shards: rank r reads shard
r % n and keeps the samples i with i % k == r // n, where k ranks share that shard, so each
sample is still read by exactly one rank. A training epoch is one pass over each rank's share,
shuffled and augmented from (seed, rank, epoch), cut to `steps_in_epoch` batches (the smallest
rank's share), so every rank runs the same steps and none hangs an allreduce, and a stream started
at epoch e is the whole stream from e on (exact resume). Evaluation reads each rank's share of the
split exactly once.

Shards are checked against the manifest's sha256 when read, so a damaged shard is skipped whole.
An image that still fails to decode makes its batch fail; `ignore_errors` drops that batch and its
samples are counted (as `undecodable` in `ReadStats`) from the gap they leave in the samples'
sequence numbers. Nothing upstream of the decode can raise (see trainer.shards), so
`ignore_errors` hides no other error; a fatal reading failure ends the stream with that error.
"""
from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ingest.manifest import load_manifest
from ingest.storage import Location

from . import randomness
from .augment import AugmentConfig, eval_image, train_image
from .shards import ReadStats, ShardSource

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
# A sample missing this many positions behind the newest one seen was dropped, not reordered: the
# parallel map reorders far less than this.
REORDER_WINDOW = 10_000


@dataclass
class InputConfig:
    data: str                               # dataset URL: the --output given to ingest.shard
    image_size: int = 64                    # model input side
    batch_size: int = 128                   # per rank
    shuffle_buffer: int = 10_000            # samples
    interleave: int = 4                     # shards read at once per rank
    seed: int = 0
    deterministic: bool = False             # same seed -> same order on each rank (slower)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "shuffle_buffer", "interleave"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")


def assign_shards(shards: list[str], epoch: int, seed: int, rank: int, size: int,
                  shuffle: bool = True) -> list[tuple[str, int, int]]:
    """This rank's (shard, part, parts) for an epoch; the ranks together cover every sample once."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} must be in 0..{size - 1}")
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    count = len(order)
    if count == 0:
        return []
    if count >= size:
        return [(name, 0, 1) for name in order[rank::size]]
    sharing = len(range(rank % count, size, count))
    return [(order[rank % count], rank // count, sharing)]


class DecodeDrops:
    """Counts the samples of one stream that `ignore_errors` dropped, from the sequence numbers that
    never come out of the decode (numbered before it, seen after it, a batch at a time)."""

    def __init__(self, stats: ReadStats, window: int = REORDER_WINDOW):
        self.stats, self.window = stats, window
        self.entered = 0             # samples read into the stream
        self.next = 0                # every number below is accounted for
        self.newest = -1
        self.ahead: set[int] = set()  # seen, above `next`
        self._lock = threading.Lock()

    def enter(self, count: int) -> None:
        with self._lock:
            self.entered += count

    def see(self, numbers: np.ndarray) -> int:
        values = numbers.tolist()
        # A number below `next` was already counted as dropped: a decode stalled past the window.
        self.ahead.update(n for n in values if n >= self.next)
        self.newest = max([self.newest, *values])
        while self.next in self.ahead or self.newest - self.next > self.window:
            self._account(self.next)
        return len(numbers)

    def finish(self) -> None:
        """At the end of a finite stream: every sample that entered and never came out was dropped."""
        while self.next < self.entered:
            self._account(self.next)

    def _account(self, number: int) -> None:
        if number in self.ahead:
            self.ahead.remove(number)
        else:
            self.stats.skip("samples", "undecodable")
            log.warning("an image failed to decode and was skipped")
        self.next += 1


class Dataset:
    """A finished dataset (its manifest) and the reader every pipeline of this process shares."""

    def __init__(self, config: InputConfig, stats: ReadStats | None = None):
        location = Location(config.data, config.storage_options)
        fs, root = location.open()
        self.manifest = load_manifest(fs, root)
        self.config = config
        expected = {shard["name"]: (shard["bytes"], shard["sha256"])
                    for split in self.manifest["splits"].values() for shard in split["shards"]}
        self.source = ShardSource(location, stats, expected=expected)

    @contextlib.contextmanager
    def reader_errors(self) -> Iterator[None]:
        """Around iterating a stream: raise the reader's own failure, not TensorFlow's wrapping of it."""
        try:
            yield
        except tf.errors.OpError:
            self.source.check()
            raise

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def samples(self, split: str) -> int:
        return self._split(split)["samples"]

    def steps_per_epoch(self, size: int) -> int:
        """Nominal steps of an epoch (the LR schedule counts in these): the split over global batches."""
        steps = self.samples("train") // (self.config.batch_size * size)
        if steps < 1:
            raise ValueError(f"train split has {self.samples('train')} samples, fewer than one global batch "
                             f"({self.config.batch_size} x {size} ranks)")
        return steps

    def steps_in_epoch(self, epoch: int, size: int) -> int:
        """The steps every rank runs in `epoch`: the smallest rank's share in whole batches (shares
        differ by up to a shard), so no rank runs dry and hangs an allreduce; each rank drops the
        rest of its share, a different remainder each epoch as the order is reshuffled."""
        counts = {shard["name"]: shard["samples"] for shard in self._split("train")["shards"]}
        shares = [sum(len(range(part, counts[name], parts))
                      for name, part, parts in assign_shards(list(counts), epoch, self.config.seed, rank, size))
                  for rank in range(size)]
        steps = min(shares) // self.config.batch_size
        if steps < 1:
            raise ValueError(f"in epoch {epoch} a rank's share of the train split is {min(shares)} samples, fewer "
                             f"than one batch ({self.config.batch_size}); use a smaller --batch-size or fewer ranks")
        return steps

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in the dataset (has {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def _shard_names(self, split: str) -> list[str]:
        return [s["name"] for s in self._split(split)["shards"]]

    def _stream(self, assignments: tf.data.Dataset, labelled: bool, drops: DecodeDrops) -> tf.data.Dataset:
        """(jpeg, label) samples of the assigned shards, `interleave` shards read at once. Whole shards
        go through the interleave and are cut into samples after it: per sample, the interleave's
        hand-over between threads cost 4% of the throughput of 64 px images."""
        signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64),
                     tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32))

        def shard(name: bytes, part: int, parts: int) -> Iterator[tuple]:
            samples = self.source.samples(name.decode(), int(part), int(parts), labelled)
            drops.enter(len(samples[1]))
            yield samples

        def read(name, part, parts):
            return tf.data.Dataset.from_generator(shard, args=(name, part, parts), output_signature=signature)

        shards = assignments.interleave(read, cycle_length=self.config.interleave,
                                        num_parallel_calls=self.config.interleave,
                                        deterministic=self.config.deterministic)
        return shards.map(lambda data, offsets, lengths, labels:
                          (tf.strings.substr(data, offsets, lengths), labels)).unbatch()

    def _decode(self, samples: tf.data.Dataset, transform: Callable, drops: DecodeDrops, drop_remainder: bool,
                whole: bool) -> tf.data.Dataset:
        """Decode + augment in a parallel map, drop and count the images that fail, batch. The stream
        ends by raising the reader's fatal failure, if there was one. `whole`: every sample read is
        meant to come out (evaluation), so those that never did are counted as dropped at the end;
        training reads more than it takes (the rest of a share, a shuffle buffer's worth)."""
        decoded = samples.enumerate().map(lambda number, sample: (*transform(number, sample), number),
                                          num_parallel_calls=AUTOTUNE, deterministic=self.config.deterministic)
        # ignore_errors after the batch: between them it would stop tf.data fusing the map into the
        # batch, which cost 15% of the throughput. So a bad image costs its batch, all counted.

        def count(images, labels, numbers):
            seen = tf.py_function(lambda n: drops.see(n.numpy()), [numbers], tf.int64)
            with tf.control_dependencies([seen]):
                return tf.identity(images), labels

        batches = decoded.batch(self.config.batch_size, drop_remainder=drop_remainder).ignore_errors().map(count)

        def end() -> Iterator:
            if whole:
                drops.finish()
            self.source.check()
            yield from ()

        ending = tf.data.Dataset.from_generator(end, output_signature=batches.element_spec)
        return batches.concatenate(ending).prefetch(AUTOTUNE)

    def train(self, rank: int = 0, size: int = 1, start_epoch: int = 0, end_epoch: int | None = None,
              start_step: int = 0) -> tf.data.Dataset:
        """(images [batch, s, s, 3] uint8, labels [batch] int32) for this rank, epochs `start_epoch`
        up to `end_epoch` (default: one epoch), each exactly `steps_in_epoch` batches of one pass over
        this rank's share. Epoch e's order and augmentation depend only on (seed, rank, e), so a run
        resumed at epoch e reads what the uninterrupted run read; `start_step` batches of the first epoch
        are skipped before decoding (a resume from a mid-epoch checkpoint)."""
        names = self._shard_names("train")
        if not names:
            raise ValueError("the dataset's train split has no shards")
        end_epoch = start_epoch + 1 if end_epoch is None else end_epoch
        seed, batch = self.config.seed, self.config.batch_size
        signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32))
        drops = DecodeDrops(self.source.stats)

        def one_epoch(epoch: int, skip: int = 0) -> tf.data.Dataset:
            def shards() -> Iterator[tuple[str, int, int]]:
                if not self.source.failure:
                    yield from assign_shards(names, epoch, seed, rank, size)

            assignments = tf.data.Dataset.from_generator(shards, output_signature=signature)
            samples = self._stream(assignments, True, drops).shuffle(
                self.config.shuffle_buffer, seed=randomness.derive(seed, rank, f"shuffle-{epoch}") % 2 ** 31)
            # Each element's augmentation seed: (this rank's and epoch's seed, its place in the epoch).
            augment_seed = tf.constant(randomness.derive(seed, rank, f"augment-{epoch}"), tf.int64)
            # A share left short by skipped shards is read again to fill the epoch: every rank must run
            # the same steps. (An empty share ends the epoch: repeat() stops on an empty input.)
            return samples.repeat().take(self.steps_in_epoch(epoch, size) * batch).enumerate().skip(skip).map(
                lambda index, sample: (tf.stack([augment_seed, index]), *sample))

        stream = one_epoch(start_epoch, start_step * batch)
        for epoch in range(start_epoch + 1, end_epoch):
            stream = stream.concatenate(one_epoch(epoch))
        size_, augment = self.config.image_size, self.config.augment
        return self._decode(stream, lambda number, sample: (train_image(sample[1], sample[0], size_, augment),
                                                            sample[2]),
                            drops, drop_remainder=True, whole=False)

    def evaluate(self, split: str = "val", rank: int = 0, size: int = 1) -> tf.data.Dataset:
        """This rank's share of the split, once, in batches (the last one may be smaller)."""
        labelled = self._split(split)["labelled"]
        mine = assign_shards(self._shard_names(split), 0, self.config.seed, rank, size, shuffle=False)
        names, parts, counts = (list(column) for column in zip(*mine)) if mine else ([], [], [])
        assignments = tf.data.Dataset.from_tensor_slices(
            (tf.constant(names, tf.string), tf.constant(parts, tf.int32), tf.constant(counts, tf.int32)))
        drops = DecodeDrops(self.source.stats)
        size_, augment = self.config.image_size, self.config.augment
        return self._decode(self._stream(assignments, labelled, drops),
                            lambda number, sample: (eval_image(sample[0], size_, augment), sample[1]),
                            drops, drop_remainder=False, whole=True)

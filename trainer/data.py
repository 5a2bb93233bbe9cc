"""Manifest -> this rank's shards -> tf.data: stream, shuffle, decode + augment in parallel, batch.

Epoch e: every rank computes the same seeded permutation of the split's shards and takes
`shards[rank::size]`. With fewer shards than ranks, the ranks share shards: rank r reads shard
r % n and keeps the samples i with i % k == r // n, where k ranks share that shard, so each
sample is still read by exactly one rank. The training stream repeats forever; every rank runs
`steps_per_epoch = floor(train_samples / global_batch)` steps, so none runs dry and hangs an
allreduce. Evaluation reads each rank's share of the split exactly once.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from ingest.manifest import load_manifest
from ingest.storage import Location

from .augment import AugmentConfig, eval_image, train_image
from .shards import ReadStats, ShardSource

AUTOTUNE = tf.data.AUTOTUNE


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


class Dataset:
    """A finished dataset (its manifest) and the reader every pipeline of this process shares."""

    def __init__(self, config: InputConfig, stats: ReadStats | None = None):
        location = Location(config.data, config.storage_options)
        fs, root = location.open()
        self.manifest = load_manifest(fs, root)
        self.config = config
        self.source = ShardSource(location, stats)

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def samples(self, split: str) -> int:
        return self._split(split)["samples"]

    def steps_per_epoch(self, size: int) -> int:
        steps = self.samples("train") // (self.config.batch_size * size)
        if steps < 1:
            raise ValueError(f"train split has {self.samples('train')} samples, fewer than one global batch "
                             f"({self.config.batch_size} x {size} ranks)")
        return steps

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in the dataset (has {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def _shard_names(self, split: str) -> list[str]:
        return [s["name"] for s in self._split(split)["shards"]]

    def _stream(self, assignments: tf.data.Dataset, labelled: bool) -> tf.data.Dataset:
        """(jpeg, label) samples of the assigned shards, `interleave` shards at a time."""
        signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64),
                     tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32))

        def read(name, part, parts):
            shard = tf.data.Dataset.from_generator(
                lambda n, p, k: iter([self.source.samples(n.decode(), int(p), int(k), labelled)]),
                args=(name, part, parts), output_signature=signature)
            return shard.map(lambda data, offsets, lengths, labels:
                             (tf.strings.substr(data, offsets, lengths), labels)).unbatch()

        return assignments.interleave(read, cycle_length=self.config.interleave,
                                      num_parallel_calls=self.config.interleave,
                                      deterministic=self.config.deterministic)

    def train(self, rank: int = 0, size: int = 1, start_epoch: int = 0) -> tf.data.Dataset:
        """Infinite stream of (images [batch, s, s, 3] float32, labels [batch] int32) for this rank."""
        names = self._shard_names("train")
        if not names:
            raise ValueError("the dataset's train split has no shards")
        seed = self.config.seed

        def epochs() -> Iterator[tuple[str, int, int]]:
            epoch = start_epoch
            while True:
                yield from assign_shards(names, epoch, seed, rank, size)
                epoch += 1

        assignments = tf.data.Dataset.from_generator(
            epochs, output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32),
                                      tf.TensorSpec([], tf.int32)))
        samples = self._stream(assignments, labelled=True).shuffle(
            self.config.shuffle_buffer, seed=seed + rank, reshuffle_each_iteration=True)
        element_seeds = tf.data.Dataset.random(seed=seed * 1009 + rank).batch(2)
        size_, augment = self.config.image_size, self.config.augment
        images = tf.data.Dataset.zip((samples, element_seeds)).map(
            lambda sample, s: (train_image(sample[0], s, size_, augment), sample[1]),
            num_parallel_calls=AUTOTUNE, deterministic=self.config.deterministic)
        return images.batch(self.config.batch_size, drop_remainder=True).prefetch(AUTOTUNE)

    def evaluate(self, split: str = "val", rank: int = 0, size: int = 1) -> tf.data.Dataset:
        """This rank's share of the split, once, in batches (the last one may be smaller)."""
        labelled = self._split(split)["labelled"]
        mine = assign_shards(self._shard_names(split), 0, self.config.seed, rank, size, shuffle=False)
        names, parts, counts = (list(column) for column in zip(*mine)) if mine else ([], [], [])
        assignments = tf.data.Dataset.from_tensor_slices(
            (tf.constant(names, tf.string), tf.constant(parts, tf.int32), tf.constant(counts, tf.int32)))
        size_, augment = self.config.image_size, self.config.augment
        images = self._stream(assignments, labelled).map(
            lambda jpeg, label: (eval_image(jpeg, size_, augment), label), num_parallel_calls=AUTOTUNE)
        return images.batch(self.config.batch_size).prefetch(AUTOTUNE)


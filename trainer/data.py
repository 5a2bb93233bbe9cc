"""Manifest -> this rank's shards -> tf.data: stream, shuffle, decode in parallel, batch (uint8).

Epoch e: every rank computes the same seeded permutation of the split's shards and takes
`shards[rank::size]`. With fewer shards than ranks, the ranks share shards: rank r reads shard
r % n and keeps the samples i with i % k == r // n, where k ranks share that shard, so each
sample is still read by exactly one rank. A training epoch is one pass over each rank's share,
shuffled from (seed, rank, epoch), cut to `steps_in_epoch` batches (the smallest rank's share), so
every rank runs the same steps and none hangs an allreduce, and a stream started at epoch e is the
whole stream from e on (exact resume). Evaluation reads each rank's share of the split exactly once.

Per image the CPU only fetches, checks and decodes (and, for random-resized-crop, decodes the crop
window and resizes it: trainer.augment); the batched augmentation runs in the train step.
Memory is bounded in bytes: the shuffle buffer holds `shuffle_mb` of samples and `read_ahead_mb`
of shards are read at once (at least one shard), both converted with the split's mean sizes.

Shards are checked against the manifest's sha256 when read, so a damaged shard is skipped whole.
An image that still fails to decode makes its batch fail; `ignore_errors` drops that batch, its
samples are counted (as `undecodable` in `ReadStats`) from the gap it leaves in the batches'
numbers, and a training epoch takes a replacement batch, so it still has its steps. Nothing
upstream of the decode can raise (see trainer.shards), so `ignore_errors` hides no other error; a
fatal reading failure ends the stream with that error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from ingest.manifest import load_manifest
from ingest.storage import Location

from . import randomness
from .augment import AugmentConfig, eval_image, per_image_seeds, train_image
from .shards import ReadStats, ShardSource

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
MB = 1 << 20
# More shards in flight than this gained nothing measurable (docs/benchmarks.md) and costs threads.
MAX_IN_FLIGHT = 8


@dataclass
class InputConfig:
    data: str                               # dataset URL: the --output given to ingest.shard
    image_size: int = 64                    # model input side
    batch_size: int = 128                   # per rank
    shuffle_mb: int = 128                   # shuffle buffer, MB of samples
    read_ahead_mb: int = 128                # shards being read at once, MB (at least one shard)
    seed: int = 0
    deterministic: bool = False             # same seed -> same order on each rank (slower)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None              # tf.data's thread pool; None: this process's share of the cores

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "shuffle_mb", "read_ahead_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads} must be >= 1")


def available_cpus() -> int:
    """The cores this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def thread_share(local_size: int | None = None) -> int:
    """This rank's share of the node's cores for its input pipeline: the ranks on one node
    (HOROVOD_LOCAL_SIZE, set by horovodrun and trainer.launch) split them evenly."""
    if local_size is None:
        local_size = int(os.environ.get("HOROVOD_LOCAL_SIZE") or 1)
    return max(1, available_cpus() // max(1, local_size))


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
    """Counts the samples of one stream that `ignore_errors` dropped: a batch that failed leaves a
    gap in the batches' numbers (numbered before `ignore_errors`, seen after it, in order); at the
    end of a stream meant to come out whole, what entered and never came out (a failed last batch)."""

    def __init__(self, stats: ReadStats, batch_size: int, expected: int | None = None):
        self.stats, self.batch_size = stats, batch_size
        self.expected = expected
        self.entered = expected or 0   # samples meant to come out: read into the stream, or `expected`
        self.emitted = 0       # samples that came out
        self.dropped = 0
        self.next = 0          # the batch number expected next
        self._lock = threading.Lock()

    def enter(self, count: int) -> None:
        if self.expected is not None:   # a training epoch reads more than it takes
            return
        with self._lock:
            self.entered += count

    def see(self, number: int, size: int) -> int:
        if number > self.next:
            self._drop((number - self.next) * self.batch_size)
        self.next, self.emitted = number + 1, self.emitted + size
        return size

    def finish(self) -> None:
        """At the end of the stream: every sample that entered (or was expected) and did not come out
        was dropped."""
        self._drop(self.entered - self.emitted - self.dropped)

    def _drop(self, samples: int) -> None:
        if samples > 0:
            self.dropped += samples
            self.stats.skip("samples", "undecodable", samples)
            log.warning("a batch failed to decode and was skipped (%d samples)", samples)


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

    def _mean_bytes(self, split: str, per: str) -> float:
        """The split's shard bytes per sample (per="samples": a JPEG and its tar members) or per shard."""
        info = self._split(split)
        count = info["samples"] if per == "samples" else len(info["shards"])
        return max(1.0, sum(shard["bytes"] for shard in info["shards"]) / max(1, count))

    def shuffle_samples(self, split: str = "train") -> int:
        """The shuffle buffer in samples: `shuffle_mb` over the split's mean bytes per sample (at
        least one batch)."""
        return max(self.config.batch_size, int(self.config.shuffle_mb * MB / self._mean_bytes(split, "samples")))

    def shards_in_flight(self, split: str = "train") -> int:
        """Shards read at once: `read_ahead_mb` over the split's mean shard size, 1..MAX_IN_FLIGHT."""
        return max(1, min(MAX_IN_FLIGHT, int(self.config.read_ahead_mb * MB // self._mean_bytes(split, "shards"))))

    def _options(self) -> tf.data.Options:
        """This rank's own thread pool, its share of the node's cores: ranks on one node do not
        oversubscribe them; one thread per op inside it (the parallelism is across images)."""
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.config.threads or thread_share()
        options.threading.max_intra_op_parallelism = 1
        options.deterministic = self.config.deterministic
        return options

    def _stream(self, assignments: list[tuple[str, int, int]], labelled: bool, drops: DecodeDrops,
                split: str) -> tf.data.Dataset:
        """(jpeg, label) samples of the assigned (shard, part, parts), `shards_in_flight` read at once.
        Whole shards go through the parallel read and are cut into samples after it: per sample, the
        hand-over between threads cost 4% of the throughput of 64 px images."""
        names, parts, counts = (list(column) for column in zip(*assignments)) if assignments else ([], [], [])
        assignments = tf.data.Dataset.from_tensor_slices(
            (tf.constant(names, tf.string), tf.constant(parts, tf.int32), tf.constant(counts, tf.int32)))

        def shard(name, part, parts) -> tuple:
            samples = self.source.samples(name.numpy().decode(), int(part), int(parts), labelled)
            drops.enter(len(samples[1]))
            return samples

        def read(name, part, parts):
            # A py_function, not from_generator: that one took 10-20 ms to start, per shard and per epoch.
            data, offsets, lengths, labels = tf.py_function(shard, [name, part, parts],
                                                            [tf.string, tf.int64, tf.int64, tf.int32])
            return data, tf.ensure_shape(offsets, [None]), tf.ensure_shape(lengths, [None]), labels

        in_flight = self.shards_in_flight(split)
        shards = assignments.map(read, num_parallel_calls=in_flight, deterministic=self.config.deterministic)
        return shards.map(lambda data, offsets, lengths, labels:
                          (tf.strings.substr(data, offsets, lengths), labels)).unbatch()

    def _decode(self, samples: tf.data.Dataset, transform: Callable, drops: DecodeDrops,
                drop_remainder: bool) -> tf.data.Dataset:
        """Decode in a parallel map fused with the batch; batches that fail are dropped and counted."""
        decoded = samples.map(transform, num_parallel_calls=AUTOTUNE, deterministic=self.config.deterministic)
        # ignore_errors after the batch: between them it would stop tf.data fusing the map into the
        # batch, which cost 15% of the throughput. So a bad image costs its batch, all counted.
        batches = decoded.batch(self.config.batch_size, drop_remainder=drop_remainder).enumerate().ignore_errors()

        def count(number, batch):
            images, labels = batch
            seen = tf.py_function(lambda n, b: drops.see(int(n), int(b)), [number, tf.shape(labels)[0]], tf.int64)
            with tf.control_dependencies([seen]):
                return tf.identity(images), labels

        return batches.map(count)

    @staticmethod
    def _counted(drops: DecodeDrops, spec) -> tf.data.Dataset:
        """No elements: at this point of a stream, `drops` counts what its part lost."""
        def end() -> Iterator:
            drops.finish()
            yield from ()

        return tf.data.Dataset.from_generator(end, output_signature=spec)

    def _ending(self, batches: tf.data.Dataset, drops: DecodeDrops | None) -> tf.data.Dataset:
        """The stream ends by counting what a whole stream lost (`drops`) and raising the reader's
        fatal failure, if there was one; prefetched, with this rank's options."""
        def end() -> Iterator:
            self.source.check()
            yield from ()

        if drops:
            batches = batches.concatenate(self._counted(drops, batches.element_spec))
        ending = tf.data.Dataset.from_generator(end, output_signature=batches.element_spec)
        return batches.concatenate(ending).prefetch(AUTOTUNE).with_options(self._options())

    def train(self, rank: int = 0, size: int = 1, start_epoch: int = 0, end_epoch: int | None = None,
              start_step: int = 0) -> tf.data.Dataset:
        """(images [batch, s, s, 3] uint8, labels [batch] int32) for this rank, epochs `start_epoch`
        up to `end_epoch` (default: one epoch), each exactly `steps_in_epoch` batches of one pass over
        this rank's share, before the batched augmentation (`augment_batch`, the train step's). Epoch
        e's order and per-image crops depend only on (seed, rank, e), so a run resumed at epoch e
        reads what the uninterrupted run read; `start_step` batches of the first epoch are skipped
        before decoding (a resume from a mid-epoch checkpoint)."""
        names = self._shard_names("train")
        if not names:
            raise ValueError("the dataset's train split has no shards")
        end_epoch = start_epoch + 1 if end_epoch is None else end_epoch
        seed, batch, buffer = self.config.seed, self.config.batch_size, self.shuffle_samples("train")
        size_, augment = self.config.image_size, self.config.augment

        def shuffled(epoch: int, purpose: str, drops: DecodeDrops) -> tf.data.Dataset:
            return self._stream(assign_shards(names, epoch, seed, rank, size), True, drops, "train").shuffle(
                buffer, seed=randomness.derive(seed, rank, f"{purpose}-{epoch}") % 2 ** 31)

        def decoded(stream: tf.data.Dataset, epoch: int, start: int, purpose: str,
                    drops: DecodeDrops) -> tf.data.Dataset:
            if not per_image_seeds(augment):
                return self._decode(stream, lambda jpeg, label: (train_image(jpeg, None, size_, augment), label),
                                    drops, drop_remainder=True)
            # Each image's crop from (this rank's and epoch's seed, its place in the epoch).
            crop_seed = tf.constant(randomness.derive(seed, rank, f"{purpose}-crop-{epoch}"), tf.int64)
            return self._decode(stream.enumerate(start=start),
                                lambda index, sample: (train_image(sample[0], tf.stack([crop_seed, index]), size_,
                                                                   augment), sample[1]),
                                drops, drop_remainder=True)

        def one_epoch(epoch: int, skip: int = 0) -> tf.data.Dataset:
            steps = self.steps_in_epoch(epoch, size)
            drops = DecodeDrops(self.source.stats, batch, expected=(steps - skip) * batch)
            # A share left short by skipped shards is read again to fill the epoch: every rank must run
            # the same steps. (An empty share ends the epoch: repeat() stops on an empty input.)
            stream = shuffled(epoch, "shuffle", drops).repeat().take(steps * batch)
            if skip:
                stream = stream.skip(skip * batch)
            batches = decoded(stream, epoch, skip * batch, "augment", drops)
            # Batches that failed to decode are replaced from another pass, so the epoch keeps its
            # steps; only then is the spare pass read.
            spare_drops = DecodeDrops(self.source.stats, batch, expected=steps * batch)
            spares = decoded(shuffled(epoch, "spare", spare_drops).take(steps * batch), epoch, 0, "spare",
                             spare_drops)
            return batches.concatenate(self._counted(drops, batches.element_spec)).concatenate(
                spares).take(steps - skip)

        # The epochs in order through a parallel interleave of one: it starts the next epoch (reading,
        # filling its shuffle buffer, decoding its first batches) while this one is consumed, so short
        # epochs do not pay for a cold pipeline each (140 ms an epoch of 1,500 images, before).
        epochs = tf.data.Dataset.from_tensors(one_epoch(start_epoch, start_step))
        for epoch in range(start_epoch + 1, end_epoch):
            epochs = epochs.concatenate(tf.data.Dataset.from_tensors(one_epoch(epoch)))
        stream = epochs.interleave(lambda epoch: epoch, cycle_length=1, num_parallel_calls=1, deterministic=True)
        return self._ending(stream, None)

    def evaluate(self, split: str = "val", rank: int = 0, size: int = 1) -> tf.data.Dataset:
        """This rank's share of the split, once, in batches (the last one may be smaller)."""
        labelled = self._split(split)["labelled"]
        mine = assign_shards(self._shard_names(split), 0, self.config.seed, rank, size, shuffle=False)
        drops = DecodeDrops(self.source.stats, self.config.batch_size)
        size_, augment = self.config.image_size, self.config.augment
        return self._ending(self._decode(self._stream(mine, labelled, drops, split),
                                         lambda jpeg, label: (eval_image(jpeg, size_, augment), label),
                                         drops, drop_remainder=False), drops)

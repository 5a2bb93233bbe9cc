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
of shards are read ahead, both converted with the split's mean sizes; one shard is always held
whole (it is verified before use), and a shard bigger than `read_ahead_mb` is read only when
needed, with no epoch opened ahead.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.data.ops import interleave_op

from ingest.manifest import load_manifest
from ingest.storage import Location

from .augment import AugmentConfig, eval_image, per_image_seeds, train_image
from .epochs import SPARE_PASSES, DecodeDrops, EpochPlan, EpochShort, assign_shards, steps_in_epoch
from .shards import ReadStats, ShardSource

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
MB = 1 << 20
# More shards in flight than this gained nothing measurable (docs/benchmarks.md) and costs threads.
MAX_IN_FLIGHT = 8
# A bigger shuffle buffer slowed the pipeline (64 px, 2 cores: 0.88x of decode-only with 8,000
# samples, 0.77x with 64,000) and adds no measurable randomness: shards already mix classes, their
# order is reshuffled every epoch and several are read at once.
MAX_SHUFFLE_SAMPLES = 10_000
# Epochs of a small data set opened ahead: enough to hide an epoch's start (docs/benchmarks.md).
MAX_EPOCHS_AHEAD = 4


@dataclass
class InputConfig:
    data: str                               # dataset URL: the --output given to ingest.shard
    image_size: int = 64                    # model input side
    batch_size: int = 128                   # per rank
    shuffle_mb: int = 128                   # shuffle buffer, MB of samples
    read_ahead_mb: int = 128                # shards read ahead, MB (none when one is bigger)
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


@contextlib.contextmanager
def _seeded_by_arguments() -> Iterator[None]:
    """Random ops built inside take their seed from their argument alone, not also from the global
    seed (tf.random.set_seed): the data order depends on (seed, rank, epoch) only, and a tensor seed
    works (with a global seed of 0, tf.data would compare the tensor with 0 in Python)."""
    graph = tf.compat.v1.get_default_graph()
    saved, graph.seed = graph.seed, None
    try:
        yield
    finally:
        graph.seed = saved


class Dataset:
    """A finished dataset (its manifest) and the reader every pipeline of this process shares."""

    def __init__(self, config: InputConfig, stats: ReadStats | None = None):
        location = Location(config.data, config.storage_options)
        fs, root = location.open()
        self.manifest = load_manifest(fs, root)
        self.config = config
        expected = {shard["name"]: (shard["bytes"], shard["sha256"])
                    for split in self.manifest["splits"].values() for shard in split["shards"]}
        self.source = ShardSource(location, stats, expected=expected, classes=self.num_classes)
        self.short_epochs: dict[int, EpochShort] = {}   # epochs a stream could not fill (read ahead too)

    @contextlib.contextmanager
    def reader_errors(self) -> Iterator[None]:
        """Around iterating a stream: raise the reader's own failure, not TensorFlow's wrapping of it;
        failing that, the first epoch that could not be filled."""
        try:
            yield
        except tf.errors.OpError:
            self.source.check()
            if self.short_epochs:
                raise self.short_epochs[min(self.short_epochs)] from None
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
        """The steps every rank runs in `epoch` (trainer.epochs.steps_in_epoch)."""
        return steps_in_epoch(self._counts(), epoch, self.config.seed, size, self.config.batch_size)

    def _counts(self) -> dict[str, int]:
        return {shard["name"]: shard["samples"] for shard in self._split("train")["shards"]}

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

    def image_size(self, split: str) -> tuple[int, int] | None:
        """(height, width) of every image of the split when ingest recorded one size for all of its
        shards (TinyImageNet's 64 x 64), else None."""
        sizes = {tuple(shard.get("image_size") or ()) for shard in self._split(split)["shards"]}
        size = sizes.pop() if len(sizes) == 1 else ()
        return size if len(size) == 2 else None

    def shuffle_samples(self, split: str = "train") -> int:
        """The shuffle buffer in samples: `shuffle_mb` over the split's mean bytes per sample, at most
        MAX_SHUFFLE_SAMPLES, at least one batch."""
        samples = min(MAX_SHUFFLE_SAMPLES, int(self.config.shuffle_mb * MB / self._mean_bytes(split, "samples")))
        return max(self.config.batch_size, samples)

    def shards_in_flight(self, split: str = "train") -> int:
        """Shards read ahead of the one being cut into samples: `read_ahead_mb` over the split's mean
        shard size, at most MAX_IN_FLIGHT; 0 (each shard read when the stream needs it) when a shard
        is bigger than `read_ahead_mb`: memory first, as one shard is already held whole."""
        return min(MAX_IN_FLIGHT, int(self.config.read_ahead_mb * MB // self._mean_bytes(split, "shards")))

    def epochs_ahead(self, size: int) -> int:
        """Epochs a training stream opens before the current one ends, so that an epoch does not
        start cold: as many as fit in `read_ahead_mb` with a rank's share of the split (a small data
        set's epochs are short), at least 1, at most MAX_EPOCHS_AHEAD; 0 when shards are bigger
        than `read_ahead_mb` (another open epoch would hold another one)."""
        if not self.shards_in_flight("train"):
            return 0
        share = self._mean_bytes("train", "shards") * len(self._shard_names("train")) / size
        return max(1, min(MAX_EPOCHS_AHEAD, int(self.config.read_ahead_mb * MB // max(share, 1.0))))

    def _options(self) -> tf.data.Options:
        """This rank's own thread pool, its share of the node's cores: ranks on one node do not
        oversubscribe them; one thread per op inside it (the parallelism is across images)."""
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.config.threads or thread_share()
        options.threading.max_intra_op_parallelism = 1
        # Fused, shuffle + repeat never ends on an empty pass after a full one: a stream whose storage
        # failed mid-epoch spun forever instead of ending with the failure.
        options.experimental_optimization.shuffle_and_repeat_fusion = False
        options.deterministic = self.config.deterministic
        return options

    @staticmethod
    def _assigned(assignments: list[tuple[str, int, int]]) -> tf.data.Dataset:
        names, parts, counts = (list(column) for column in zip(*assignments)) if assignments else ([], [], [])
        return tf.data.Dataset.from_tensor_slices(
            (tf.constant(names, tf.string), tf.constant(parts, tf.int32), tf.constant(counts, tf.int32)))

    def _stream(self, assignments: tf.data.Dataset, labelled: bool, drops: DecodeDrops | None,
                split: str) -> tf.data.Dataset:
        """(jpeg, label) samples of the assigned (shard, part, parts), `shards_in_flight` read at once.
        Whole shards go through the parallel read and are cut into samples after it: per sample, the
        hand-over between threads cost 4% of the throughput of 64 px images."""
        def shard(name, part, parts) -> tuple:
            data, offsets, lengths, labels = self.source.samples(name.numpy().decode(), int(part), int(parts),
                                                                 labelled)
            if drops:
                drops.enter(len(labels))
            # As a 0-d object array the bytes become a tf.string with one copy; as bytes, with three
            # (a 500 MB shard peaked at 2 GB more).
            return np.array(data, dtype=object), offsets, lengths, labels

        def read(name, part, parts):
            # A py_function, not from_generator: that one took 10-20 ms to start, per shard and per epoch.
            data, offsets, lengths, labels = tf.py_function(shard, [name, part, parts],
                                                            [tf.string, tf.int64, tf.int64, tf.int32])
            return tuple(tf.ensure_shape(t, shape) for t, shape in zip((data, offsets, lengths, labels),
                                                                      ([], [None], [None], [None])))

        in_flight = self.shards_in_flight(split)
        shards = (assignments.map(read, num_parallel_calls=in_flight, deterministic=self.config.deterministic)
                  if in_flight else assignments.map(read))
        return shards.map(lambda data, offsets, lengths, labels:
                          (tf.strings.substr(data, offsets, lengths), labels)).unbatch()

    def _decode(self, samples: tf.data.Dataset, transform: Callable, see: Callable, drop_remainder: bool,
                args: tuple = ()) -> tf.data.Dataset:
        """Decode in a parallel map fused with the batch; batches that fail are dropped and counted
        by `see(*args, batch number, batch size)` (`DecodeDrops.see`, called with ints)."""
        decoded = samples.map(transform, num_parallel_calls=AUTOTUNE, deterministic=self.config.deterministic)
        # ignore_errors after the batch: between them it would stop tf.data fusing the map into the
        # batch, which cost 15% of the throughput. So a bad image costs its batch, all counted.
        batches = decoded.batch(self.config.batch_size, drop_remainder=drop_remainder).enumerate().ignore_errors()

        def count(number, batch):
            images, labels = batch
            seen = tf.py_function(lambda *values: see(*(int(value) for value in values)),
                                  [*args, number, tf.shape(labels)[0]], tf.int64)
            with tf.control_dependencies([seen]):
                return tf.identity(images), labels

        return batches.map(count)

    @staticmethod
    @tf.autograph.experimental.do_not_convert
    def _counted(finish: Callable, spec, args: tuple = ()) -> tf.data.Dataset:
        """No elements: at this point of a stream, `finish(*args)` counts what its part lost."""
        def end(*values) -> Iterator:
            finish(*values)
            yield from ()

        return tf.data.Dataset.from_generator(end, args=args or None, output_signature=spec)

    def _complete(self, plan: EpochPlan, epoch: int) -> None:
        short = plan.shortfall(epoch)
        if short:
            self.source.check()   # a fatal reading failure is the cause
            self.short_epochs[epoch] = short   # what reader_errors raises
            raise short

    def _ending(self, batches: tf.data.Dataset, drops: DecodeDrops | None) -> tf.data.Dataset:
        """The stream ends by counting what a whole stream lost (`drops`) and raising the reader's
        fatal failure, if there was one; prefetched, with this rank's options."""
        def end() -> Iterator:
            self.source.check()
            yield from ()

        if drops:
            batches = batches.concatenate(self._counted(drops.finish, batches.element_spec))
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
        if not self._shard_names("train"):
            raise ValueError("the dataset's train split has no shards")
        end_epoch = start_epoch + 1 if end_epoch is None else end_epoch
        batch, buffer = self.config.batch_size, self.shuffle_samples("train")
        size_, augment, stored = self.config.image_size, self.config.augment, self.image_size("train")
        ahead = self.epochs_ahead(size)
        plan = EpochPlan(self._counts(), self.config.seed, rank, size, batch, self.source.stats, start_epoch,
                         start_step, ahead)
        plan.steps(start_epoch)   # a share smaller than a batch fails here, not in the stream

        def facts(epoch) -> tuple:
            epoch = int(epoch)
            names, parts, counts = zip(*plan.assignments(epoch))
            # A buffer bigger than the share it shuffles holds no more, but cost ~30 ms of CPU an
            # epoch in TensorFlow 2.21 (1,500 images: 10,000 against 1,500), so it is cut to the share.
            buffer_size = max(1, min(buffer, plan.share(epoch)))
            return (list(names), list(parts), list(counts), plan.steps(epoch), plan.skip(epoch), plan.seeds(epoch),
                    buffer_size)

        def decoded(stream: tf.data.Dataset, crop_seed: tf.Tensor, start: tf.Tensor, epoch: tf.Tensor, purpose: str):
            def see(epoch_, number, count):
                return plan.drops(epoch_, purpose).see(number, count)

            if not per_image_seeds(augment):
                return self._decode(stream, lambda jpeg, label: (train_image(jpeg, None, size_, augment, stored), label),
                                    see, drop_remainder=True, args=(epoch,))
            # Each image's crop from (this rank's and epoch's seed, its place in the epoch).
            return self._decode(stream.enumerate(start=start),
                                lambda index, sample: (train_image(sample[0], tf.stack([crop_seed, index]), size_,
                                                                   augment), sample[1]),
                                see, drop_remainder=True, args=(epoch,))

        def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
            with _seeded_by_arguments():
                return epoch_of(epoch)

        def epoch_of(epoch: tf.Tensor) -> tf.data.Dataset:
            names, parts, counts, steps, skip, seeds, buffer_size = tf.py_function(
                facts, [epoch], [tf.string, tf.int32, tf.int32, tf.int64, tf.int64, tf.int64, tf.int64])
            steps, skip, buffer_size = (tf.ensure_shape(value, []) for value in (steps, skip, buffer_size))
            seeds = tf.ensure_shape(seeds, [4])
            assigned = tf.data.Dataset.from_tensor_slices((tf.ensure_shape(names, [None]), parts, counts))

            def shuffled(seed: tf.Tensor) -> tf.data.Dataset:
                return self._stream(assigned, True, None, "train").shuffle(buffer_size, seed=seed)

            # A share left short by skipped shards is read again to fill the epoch: every rank must run
            # the same steps. (An empty pass ends it: repeat() stops there, unfused: see _options.)
            stream = shuffled(seeds[0]).repeat().take(steps * batch)
            if start_step:   # a resumed stream; every other stream goes without the per-sample step
                stream = stream.skip(skip * batch)
            batches = decoded(stream, seeds[2], skip * batch, epoch, "shuffle")
            # Batches that failed to decode are replaced from further passes, so the epoch keeps its
            # steps; only then are the spare passes read.
            spares = decoded(shuffled(seeds[1]).repeat(SPARE_PASSES), seeds[3], tf.constant(0, tf.int64), epoch,
                             "spare")
            counted = self._counted(lambda e: plan.drops(int(e), "shuffle").finish(), batches.element_spec,
                                    (epoch,))
            # An epoch still short ends the stream: running on would misalign the epochs and the ranks.
            complete = self._counted(lambda e: self._complete(plan, int(e)), batches.element_spec, (epoch,))
            return batches.concatenate(counted).concatenate(spares).take(steps - skip).concatenate(complete)

        # Epoch by epoch through a parallel interleave of one that opens `epochs_ahead` epochs ahead:
        # the next epoch reads, fills its shuffle buffer and decodes its first batches while this one
        # is consumed, so short epochs do not start cold (140 ms an epoch of 1,500 images, before).
        # Dataset.interleave would open two ahead whatever their size. Each epoch's facts are
        # computed when the stream reaches it, so any number of epochs is cheap.
        epochs = interleave_op._ParallelInterleaveDataset(
            tf.data.Dataset.range(start_epoch, end_epoch), one_epoch, cycle_length=1, block_length=1,
            num_parallel_calls=1, prefetch_input_elements=ahead, deterministic=True)
        return self._ending(epochs, None)

    def evaluate(self, split: str = "val", rank: int = 0, size: int = 1) -> tf.data.Dataset:
        """This rank's share of the split, once, in batches (the last one may be smaller)."""
        labelled = self._split(split)["labelled"]
        mine = assign_shards(self._shard_names(split), 0, self.config.seed, rank, size, shuffle=False)
        drops = DecodeDrops(self.source.stats, self.config.batch_size)
        size_, augment = self.config.image_size, self.config.augment
        return self._ending(self._decode(self._stream(self._assigned(mine), labelled, drops, split),
                                         lambda jpeg, label: (eval_image(jpeg, size_, augment, self.image_size(split)), label),
                                         drops.see, drop_remainder=False), drops)

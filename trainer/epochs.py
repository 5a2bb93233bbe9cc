"""Which samples each rank reads in each epoch, and the counting of what an epoch's decode dropped.

Plain Python, no TensorFlow: trainer.data asks an `EpochPlan` for epoch e's facts (shards, steps,
seeds) from inside tf.data when the stream reaches that epoch, so a stream of any number of epochs
costs one epoch to build.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field

from . import randomness
from .shards import ReadStats

log = logging.getLogger(__name__)

# Passes over a rank's share that replace the batches of an epoch that failed to decode; an epoch
# still short after them (most images undecodable, or the share unreadable) ends the stream.
SPARE_PASSES = 3
# The seeds an epoch draws, in the order EpochPlan.seeds returns them.
SEEDS = ("shuffle", "spare", "augment-crop", "spare-crop")


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


def steps_in_epoch(counts: dict[str, int], epoch: int, seed: int, size: int, batch_size: int) -> int:
    """The steps every rank runs in `epoch`: the smallest rank's share in whole batches (shares
    differ by up to a shard), so no rank runs dry and hangs an allreduce; each rank drops the
    rest of its share, a different remainder each epoch as the order is reshuffled."""
    shares = [_share(counts, assign_shards(list(counts), epoch, seed, rank, size)) for rank in range(size)]
    steps = min(shares) // batch_size
    if steps < 1:
        raise ValueError(f"in epoch {epoch} a rank's share of the train split is {min(shares)} samples, fewer "
                         f"than one batch ({batch_size}); use a smaller --batch-size or fewer ranks")
    return steps


def _share(counts: dict[str, int], assignments: list[tuple[str, int, int]]) -> int:
    return sum(len(range(part, counts[name], parts)) for name, part, parts in assignments)


class EpochShort(ValueError):
    """A rank could not fill an epoch from its share: every rank must run the same steps."""


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
            log.warning("%d samples skipped: their batch failed to decode (an undecodable image)", samples)


@dataclass
class EpochPlan:
    """One rank's epochs from `start_epoch` (its first `start_step` batches skipped): per epoch the
    assigned shards, the steps, the seeds, and the drop counters of its main and spare passes."""
    counts: dict[str, int]      # the train split's shards and their samples, in manifest order
    seed: int
    rank: int
    size: int
    batch_size: int
    stats: ReadStats
    start_epoch: int = 0
    start_step: int = 0
    ahead: int = 1              # epochs the stream opens before the current one ends
    _drops: dict[tuple[int, str], DecodeDrops] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def assignments(self, epoch: int) -> list[tuple[str, int, int]]:
        return assign_shards(list(self.counts), epoch, self.seed, self.rank, self.size)

    def share(self, epoch: int) -> int:
        """The samples this rank's shards of the epoch hold (for it), per the manifest."""
        return _share(self.counts, self.assignments(epoch))

    def steps(self, epoch: int) -> int:
        return steps_in_epoch(self.counts, epoch, self.seed, self.size, self.batch_size)

    def skip(self, epoch: int) -> int:
        """Batches of `epoch` already trained on: a resume from a mid-epoch checkpoint."""
        return self.start_step if epoch == self.start_epoch else 0

    def seeds(self, epoch: int) -> list[int]:
        """The epoch's seeds named by SEEDS, from (seed, rank, epoch) only; the shuffles' fit in 31 bits."""
        derived = [randomness.derive(self.seed, self.rank, f"{name}-{epoch}") for name in SEEDS]
        return [derived[0] % 2 ** 31, derived[1] % 2 ** 31, derived[2], derived[3]]

    def drops(self, epoch: int, purpose: str) -> DecodeDrops:
        """The counter of the epoch's main ("shuffle") or spare pass. A stream has at most `ahead` + 1
        epochs open, so a counter older than that is forgotten: its epoch has ended."""
        with self._lock:
            key = (epoch, purpose)
            if key not in self._drops:
                for old in [k for k in self._drops if k[0] < epoch - self.ahead - 1]:
                    del self._drops[old]
                steps = self.steps(epoch)
                expected = (steps - self.skip(epoch)) * self.batch_size if purpose == "shuffle" else \
                    steps * self.batch_size
                self._drops[key] = DecodeDrops(self.stats, self.batch_size, expected=expected)
            return self._drops[key]

    def shortfall(self, epoch: int) -> EpochShort | None:
        """Why the epoch's stream, now ended, delivered fewer batches than its steps; None if it did not."""
        main, spare = self.drops(epoch, "shuffle"), self.drops(epoch, "spare")
        delivered = (main.emitted + spare.emitted) // self.batch_size
        wanted = self.steps(epoch) - self.skip(epoch)
        if delivered >= wanted:
            return None
        return EpochShort(f"rank {self.rank}, epoch {epoch}: only {delivered} of the {wanted} batches the epoch needs "
                          f"could be read and decoded from its share, with {SPARE_PASSES} extra passes over it "
                          f"(the log names the shards skipped and counts the undecodable images): the data set "
                          f"is damaged; python -m ingest.verify checks it")

"""The training loop: build_inputs / build_model / train_step split, exact distributed eval.

Gradients are averaged with `hvd.grouped_allreduce` inside the tf.function step (Horovod's
DistributedGradientTape fails with Keras 3). Validation accuracy is exact over the whole split
(trainer.evaluation): each rank counts correct top-1/top-5 predictions on its share and the counts
are summed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from ingest.cli import terminating

from . import dist, evaluation, optim, randomness
from .config import TrainConfig
from .augment import augment_batch
from .data import Dataset, InputConfig, thread_share
from .errors import Diverged
from .metrics import TrainerMetrics
from .models import build_model, dropout_rates
from .shards import StorageGone

log = logging.getLogger(__name__)


@dataclass
class Partial:
    """A training epoch in progress, as a mid-epoch checkpoint keeps it."""

    step: int                  # steps of the epoch done
    sums: list[float]          # [loss, top-1 hits, top-5 hits] over those steps, averaged over the ranks
    waiting: float             # seconds rank 0 waited for data in them
    seconds: float             # and spent in them


@dataclass
class EpochResult:
    epoch: int
    loss: float
    train_top1: float
    train_top5: float
    val_top1: float
    val_top5: float
    images_per_second: float
    data_wait_share: float          # of the train time spent waiting for the input pipeline
    seconds: float
    learning_rate: float = 0.0      # at the end of the epoch
    val_samples_seen: int = 0
    val_samples_expected: int = 0   # the manifest's; more than seen when val samples could not be read


def build_inputs(config: TrainConfig, workers: dist.Workers) -> Dataset:
    return Dataset(InputConfig(data=config.data, image_size=config.image_size, batch_size=config.batch_size,
                               shuffle_mb=config.shuffle_mb, read_ahead_mb=config.read_ahead_mb, seed=config.seed,
                               deterministic=config.deterministic, augment=config.augment,
                               storage_options=config.storage_options, threads=thread_share(workers.local_size)))


def set_determinism(config: TrainConfig) -> None:
    """Seeded weight initialisation always; deterministic kernels only when asked (they are slower)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def set_precision(config: TrainConfig) -> str:
    """The Keras dtype policy: float16 compute on GPUs, bfloat16 on CPUs, when asked for."""
    if not config.mixed_precision:
        policy = "float32"
    else:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


class Trainer:
    def __init__(self, config: TrainConfig, workers: dist.Workers, metrics: TrainerMetrics | None = None):
        self.config = config
        self.workers = workers
        self.metrics = metrics
        self.data = build_inputs(config, workers)
        self.steps_per_epoch = self.data.steps_per_epoch(workers.size)   # nominal: the LR schedule's unit
        self.precision = set_precision(config)
        set_determinism(config)
        self.model = build_model(config.model, self.data.num_classes, config.image_size)
        if config.model.dropout is None:   # the model's own rates, stated: config.json never says null
            config.model = dataclasses.replace(config.model, dropout=tuple(dropout_rates(self.model)) or None)
        randomness.seed_per_rank(self.model, config.seed, workers.rank)
        self.optimizer = optim.build_optimizer(config, workers.size, self.steps_per_epoch,
                                               self.model.trainable_variables)
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = optim.build_loss(config, self.data.num_classes)
        self.eval_step = evaluation.eval_step(self.model)
        if config.jit_compile and workers.is_chief and not tf.config.list_physical_devices("GPU"):
            log.warning("--jit-compile without a GPU: XLA's CPU backend ran model2's step 7x slower than "
                        "without it (docs/benchmarks.md); it is meant for GPUs")
        self.gradients = (tf.function(self._gradients, jit_compile=True) if config.jit_compile
                          else self._gradients)
        self.train_stream = None
        self.watchdog = None   # trainer.watchdog.Watchdog, set by the CLI
        # Mid-epoch checkpoints: the CLI's on_boundary saves one where the ranks agreed to.
        self.checkpoint_every = config.checkpoint_every * 60
        self.last_checkpoint = time.monotonic()
        self.stop_requested = False
        self.on_boundary: Callable[[int, Partial], None] = lambda epoch, partial: None
        # The step log (rank 0's TensorBoard): on_step(global step, optimizer iteration, loss) every
        # log_every_steps global steps (epoch x steps_per_epoch + step); 0: never.
        self.log_every_steps = 0
        self.on_step: Callable[[int, int, float], None] = lambda at, iteration, loss: None
        self.logged_step = -1

    def broadcast(self) -> None:
        """Every rank takes rank 0's weights and optimizer state; not the random state, which is per rank."""
        dist.broadcast_from_chief(self.model.weights + self.optimizer.variables)

    def start_stream(self, epoch: int = 0, step: int = 0) -> None:
        """Start reading the training data at `epoch`, `step` (a resumed run reads what the whole run would)."""
        self.train_stream = iter(self.data.train(self.workers.rank, self.workers.size, epoch, self.config.epochs, step))

    def _gradients(self, images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor):
        """The batch's augmentation (on the accelerator: trainer.augment), forward and backward pass:
        (the loss minimised, the probabilities, the gradients). XLA compiles this part alone with
        --jit-compile: Horovod's allreduce and the host clocks stay outside it."""
        images = augment_batch(images, seed, self.config.augment)
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = self.loss_fn(labels, probabilities)
            if self.model.losses:
                loss += tf.add_n([tf.cast(penalty, loss.dtype) for penalty in self.model.losses])
            scaled = self.optimizer.scale_loss(loss)   # the loss itself unless loss scaling is on
        return loss, probabilities, tape.gradient(scaled, self.model.trainable_variables)

    @tf.function
    def train_step(self, images: tf.Tensor, labels: tf.Tensor, flags: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """One synchronous step on a batch of uint8 images before augmentation (`seed`: the batch's,
        shape [2]); returns [loss averaged over ranks, this rank's correct top-1, top-5, stop,
        checkpoint, seconds computing the gradients, seconds in their allreduce]. The loss is the
        one minimised: the data loss plus the model's regularisation losses. `flags` ([stop, checkpoint]
        of this rank) ride in the same allreduce: above 0 when any rank asked, so all ranks agree on
        the step after which to checkpoint or stop. The two durations, per rank, show a straggler: it
        computes longest and waits least in the allreduce. TensorFlow refuses clock ops under op
        determinism: --deterministic runs report 0 for both."""
        timed = not self.config.deterministic
        started = _clock_after([images]) if timed else None
        loss, probabilities, gradients = self.gradients(images, labels, seed)
        computed = _clock_after(gradients) if timed else None
        # The loss rides with the gradients: every rank sees the same mean loss, so all stop together.
        *gradients, mean_loss, flags = dist.average([*gradients, loss, flags])
        reduced = _clock_after([mean_loss]) if timed else None
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        seconds = tf.cast(tf.stack([computed - started, reduced - computed]), tf.float32) if timed else tf.zeros([2])
        return tf.concat([tf.stack([mean_loss, evaluation.top_k_hits(probabilities, labels, 1),
                                    evaluation.top_k_hits(probabilities, labels, 5)]), flags, seconds], axis=0)

    def augment_seed(self, epoch: int, step: int) -> tf.Tensor:
        """The seed of a step's batched augmentation: (this rank's and epoch's seed, the step)."""
        return tf.constant([randomness.derive(self.config.seed, self.workers.rank, f"augment-{epoch}"), step],
                           tf.int64)

    def train_epoch(self, epoch: int, partial: Partial | None = None) -> tuple[float, float, float, float, float]:
        """(mean loss, top-1, top-5, images/s of this rank, data-wait share) over one epoch, from
        `partial` (a mid-epoch checkpoint's) on; the accuracies averaged over ranks. Raises Diverged at
        the first step whose loss is not finite. When the ranks agree to (SIGTERM, --checkpoint-every),
        calls `on_boundary(epoch, partial)` between two steps, and sets `stop_requested`."""
        steps = self.data.steps_in_epoch(epoch, self.workers.size)
        done = partial or Partial(0, [0.0, 0.0, 0.0], 0.0, 0.0)
        sums, previous, waiting = tf.constant(done.sums, tf.float32), None, done.waiting
        started = time.perf_counter() - done.seconds
        pending = None   # the last step, recorded when the next one starts (its result is read a step late)
        # The optimizer's iteration at step 0 of this epoch: the step log's learning rates. Read once an epoch.
        first_iteration = int(self.optimizer.iterations) - done.step if self.log_every_steps else 0
        if self.metrics:
            self.metrics.start_epoch(steps, done.step)
        for step in range(done.step, steps):
            self.progress(f"the input pipeline's batch for epoch {epoch}, step {step}")
            asked = time.perf_counter()
            self._record_step(pending, asked)
            images, labels = self.next_batch()
            got = time.perf_counter()
            waited = got - asked
            self.progress(f"epoch {epoch}, step {step}: its allreduce with the other ranks")
            result = self.train_step(images, labels, self._flags(), self.augment_seed(epoch, step))
            sums, waiting = sums + result[:3], waiting + waited
            if previous is not None:   # checked a step late, so that the check never waits for a step
                _check_finite(epoch, step - 1, previous)
                self._log_step(epoch, step - 1, previous, first_iteration)
                if self._agreed(previous) and step + 1 < steps:
                    _check_finite(epoch, step, result)
                    self._log_step(epoch, step, result, first_iteration)   # a rerun resumes after it
                    self._check_weights(epoch, step)
                    shared = dist.average([sums])[0].numpy().tolist()   # exact: the epoch's metrics average these
                    boundary = time.perf_counter()
                    self.on_boundary(epoch, Partial(step + 1, shared, waiting, boundary - started))
                    asked += time.perf_counter() - boundary   # a checkpoint is not step time
            previous, pending = result, (asked, waited, result)
        self._record_step(pending, time.perf_counter())
        _check_finite(epoch, steps - 1, previous)
        self._log_step(epoch, steps - 1, previous, first_iteration)
        self._agreed(previous)   # a stop asked at the last step: after this epoch's checkpoint
        seconds = time.perf_counter() - started
        self.progress(f"the end of epoch {epoch}: averaging statistics with the other ranks")
        self.sync_statistics()
        self._check_weights(epoch, steps - 1)
        images_seen = steps * self.config.batch_size
        loss, top1, top5 = (dist.average([sums])[0] / [steps, images_seen, images_seen]).numpy()
        rate = (steps - done.step) * self.config.batch_size / max(seconds - done.seconds, 1e-9)   # this attempt's
        return float(loss), float(top1), float(top5), rate, waiting / seconds

    def _record_step(self, pending: tuple | None, now: float) -> None:
        """A step's time, from its start to the next one's, and where it went; the readers' counters."""
        if self.metrics and pending:
            asked, waited, result = pending
            phases = {"data": waited}
            if not self.config.deterministic:   # no clock in the step then (train_step)
                phases |= dict(zip(("compute", "allreduce"), (float(seconds) for seconds in result[5:7])))
            self.metrics.record_step(self.config.batch_size, now - asked, phases)
            self.metrics.record_reads(self.data.source.stats)

    def _log_step(self, epoch: int, step: int, result: tf.Tensor, first_iteration: int) -> None:
        """The step's loss to on_step when the step log wants it. Called once its result is read (a step
        late); a step before a mid-epoch checkpoint is logged there and not again."""
        at = epoch * self.steps_per_epoch + step
        if self.log_every_steps and at % self.log_every_steps == 0 and at > self.logged_step:
            self.logged_step = at
            self.on_step(at, first_iteration + step, float(result[0]))

    def _flags(self) -> tf.Tensor:
        """This rank's [stop, checkpoint]: SIGTERM arrived; rank 0's clock says a checkpoint is due."""
        due = bool(self.checkpoint_every and self.workers.is_chief
                   and time.monotonic() - self.last_checkpoint >= self.checkpoint_every)
        return tf.constant([float(terminating()), float(due)])

    def _agreed(self, result: tf.Tensor) -> bool:
        """Whether the ranks asked, in that step, to checkpoint (or to stop, which implies it)."""
        stop, due = (float(flag) > 0 for flag in result[3:5])
        self.stop_requested = self.stop_requested or stop
        return stop or due

    def _check_weights(self, epoch: int, step: int) -> None:
        # A step's update comes after its (finite) loss: weights it made infinite would otherwise
        # be evaluated, checkpointed and saved as the best model.
        # Float weights only: some models keep counters (EfficientNet's Normalization layer: an int64 count).
        if not all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in self.model.weights if "float" in str(w.dtype)):
            raise Diverged(epoch, step, "the weights became NaN or infinite")

    def next_batch(self) -> tuple[tf.Tensor, tf.Tensor]:
        with self.data.reader_errors():
            try:
                return next(self.train_stream)
            except StopIteration:
                raise StorageGone(f"rank {self.workers.rank}: none of its share of the train split could be read "
                                  f"(every shard was skipped: see the log)") from None

    def sync_statistics(self) -> None:
        """Average the non-trained weights (BatchNorm's moving statistics, updated from each rank's own
        batches) over the ranks, so that every rank evaluates and saves the same model."""
        variables = [v for v in self.model.non_trainable_weights if "float" in str(v.dtype)]
        for variable, value in zip(variables, dist.average([v.value for v in variables])):
            variable.assign(value)

    def evaluate(self, split: str = "val") -> evaluation.Accuracy:
        """Exact top-1, top-5 over the whole split: each rank counts its share, counts are summed."""
        with self.data.reader_errors():
            counts = evaluation.count(self.eval_step, self.data.evaluate(split, self.workers.rank, self.workers.size),
                                      lambda: self.progress(f"the {split} evaluation"))
        self.progress(f"the {split} evaluation's counts from the other ranks")
        return evaluation.accuracy(dist.total([counts])[0].numpy(), self.data.samples(split))

    def progress(self, waiting_for: str) -> None:
        """Something was done; what the rank waits for next (the stall watchdog names it)."""
        if self.watchdog:
            self.watchdog.beat(waiting_for)

    def run_epoch(self, epoch: int, partial: Partial | None = None) -> EpochResult:
        started = time.perf_counter() - (partial.seconds if partial else 0.0)
        loss, train_top1, train_top5, rate, wait_share = self.train_epoch(epoch, partial)
        val = self.evaluate()
        if val.non_finite:   # a model that answers NaN must not become the best epoch by ties or chance
            raise Diverged(epoch, self.data.steps_in_epoch(epoch, self.workers.size) - 1,
                           f"the model's outputs on {val.non_finite} of {val.seen} val samples are NaN or infinite")
        learning_rate = float(self.optimizer.learning_rate)
        result = EpochResult(epoch, loss, train_top1, train_top5, val.top1, val.top5, rate, wait_share,
                             time.perf_counter() - started, learning_rate, val.seen, val.expected)
        if self.metrics:
            accuracies = {("train", 1): train_top1, ("train", 5): train_top5, ("val", 1): val.top1, ("val", 5): val.top5}
            self.metrics.record_epoch(epoch, loss, accuracies, learning_rate)
            self.metrics.record_reads(self.data.source.stats)   # the evaluation's reads
        if self.workers.is_chief:
            log.info("epoch %d: loss %.4f, train top-1 %.4f top-5 %.4f, val top-1 %.4f top-5 %.4f, "
                     "%.0f img/s per worker, %.1f%% waiting for data", epoch, loss, train_top1, train_top5,
                     val.top1, val.top5, rate, 100 * wait_share)
            if not val.exact:
                log.warning("epoch %d: val accuracy is over %d of the split's %d samples (the rest could not be "
                            "read): not exact", epoch, val.seen, val.expected)
        return result


def _clock_after(tensors: list[tf.Tensor]) -> tf.Tensor:
    """The host's clock (seconds) once `tensors` are computed. On a GPU a control dependency alone
    would fire when their kernels are queued: a scalar made from all of them, copied to the host,
    waits for the kernels to finish."""
    values = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]
    probe = tf.add_n([tf.cast(tf.reshape(v, [-1])[0], tf.float32) for v in values])
    with tf.device("/CPU:0"):
        with tf.control_dependencies([tf.identity(probe)]):
            return tf.timestamp()


def _check_finite(epoch: int, step: int, result: tf.Tensor) -> None:
    loss = float(result[0])
    if not math.isfinite(loss):
        raise Diverged(epoch, step, f"the loss was {loss}")

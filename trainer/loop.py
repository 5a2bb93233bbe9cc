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
from dataclasses import dataclass

import keras
import tensorflow as tf

from ingest.cli import raise_if_terminated

from . import dist, evaluation, optim, randomness
from .config import TrainConfig
from .data import Dataset, InputConfig
from .errors import Diverged
from .metrics import TrainerMetrics
from .models import build_model, dropout_rates
from .shards import StorageGone

log = logging.getLogger(__name__)


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


def build_inputs(config: TrainConfig) -> Dataset:
    return Dataset(InputConfig(data=config.data, image_size=config.image_size, batch_size=config.batch_size,
                               shuffle_buffer=config.shuffle_buffer, interleave=config.interleave, seed=config.seed,
                               deterministic=config.deterministic, augment=config.augment,
                               storage_options=config.storage_options))


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
        self.data = build_inputs(config)
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
        self.train_stream = None
        self.watchdog = None   # trainer.watchdog.Watchdog, set by the CLI

    def broadcast(self) -> None:
        """Every rank takes rank 0's weights and optimizer state; not the random state, which is per rank."""
        dist.broadcast_from_chief(self.model.weights + self.optimizer.variables)

    def start_stream(self, epoch: int = 0) -> None:
        """Start reading the training data at `epoch` (a resumed run reads what the whole run would)."""
        self.train_stream = iter(self.data.train(self.workers.rank, self.workers.size, epoch, self.config.epochs))

    @tf.function
    def train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """One synchronous step; returns [loss averaged over ranks, this rank's correct top-1, top-5]. The
        loss is the one minimised: the data loss plus the model's regularisation losses (e.g. L2 penalties)."""
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = self.loss_fn(labels, probabilities)
            if self.model.losses:
                loss += tf.add_n([tf.cast(penalty, loss.dtype) for penalty in self.model.losses])
            scaled = self.optimizer.scale_loss(loss)   # the loss itself unless loss scaling is on
        variables = self.model.trainable_variables
        # The loss rides with the gradients: every rank sees the same mean loss, so all stop together.
        *gradients, mean_loss = dist.average([*tape.gradient(scaled, variables), loss])
        self.optimizer.apply_gradients(zip(gradients, variables))
        return tf.stack([mean_loss, evaluation.top_k_hits(probabilities, labels, 1),
                         evaluation.top_k_hits(probabilities, labels, 5)])

    def train_epoch(self, epoch: int) -> tuple[float, float, float, float, float]:
        """(mean loss, top-1, top-5, images/s of this rank, data-wait share) over one epoch;
        the accuracies averaged over ranks. Raises Diverged at the first step whose loss is not finite."""
        steps = self.data.steps_in_epoch(epoch, self.workers.size)
        sums, previous = tf.zeros([3]), None
        started, waiting = time.perf_counter(), 0.0
        for step in range(steps):
            raise_if_terminated()
            self.progress(f"the input pipeline's batch for epoch {epoch}, step {step}")
            asked = time.perf_counter()
            images, labels = self.next_batch()
            got = time.perf_counter()
            self.progress(f"epoch {epoch}, step {step}: its allreduce with the other ranks")
            result = self.train_step(images, labels)
            if previous is not None:   # checked a step late, so that the check never waits for a step
                _check_finite(epoch, step - 1, previous)
            sums, previous = sums + result, result
            waiting += got - asked
            if self.metrics:
                self.metrics.record_step(self.config.batch_size, time.perf_counter() - asked, got - asked)
        _check_finite(epoch, steps - 1, previous)
        seconds = time.perf_counter() - started
        self.progress(f"the end of epoch {epoch}: averaging statistics with the other ranks")
        self.sync_statistics()
        # The last step's update is after its (finite) loss: weights it made infinite would otherwise
        # be evaluated, checkpointed and saved as the best model.
        if not all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in self.model.weights):
            raise Diverged(epoch, steps - 1, "the weights became NaN or infinite")
        images_seen = steps * self.config.batch_size
        loss, top1, top5 = (dist.average([sums])[0] / [steps, images_seen, images_seen]).numpy()
        return float(loss), float(top1), float(top5), images_seen / seconds, waiting / seconds

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

    def run_epoch(self, epoch: int) -> EpochResult:
        started = time.perf_counter()
        loss, train_top1, train_top5, rate, wait_share = self.train_epoch(epoch)
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
            self.metrics.record_reads(self.data.source.stats)
        if self.workers.is_chief:
            log.info("epoch %d: loss %.4f, train top-1 %.4f top-5 %.4f, val top-1 %.4f top-5 %.4f, "
                     "%.0f img/s per worker, %.1f%% waiting for data", epoch, loss, train_top1, train_top5,
                     val.top1, val.top5, rate, 100 * wait_share)
            if not val.exact:
                log.warning("epoch %d: val accuracy is over %d of the split's %d samples (the rest could not be "
                            "read): not exact", epoch, val.seen, val.expected)
        return result


def _check_finite(epoch: int, step: int, result: tf.Tensor) -> None:
    loss = float(result[0])
    if not math.isfinite(loss):
        raise Diverged(epoch, step, f"the loss was {loss}")

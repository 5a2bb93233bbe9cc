"""The training loop: build_inputs / build_model / train_step split, exact distributed eval.

Gradients are averaged with `hvd.grouped_allreduce` inside the tf.function step (Horovod's
DistributedGradientTape fails with Keras 3). Validation accuracy is exact over the whole split:
each rank counts correct top-1/top-5 predictions on its share and the counts are summed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import keras
import tensorflow as tf

from . import dist
from .config import TrainConfig
from .data import Dataset, InputConfig
from .metrics import TrainerMetrics
from .models import build_model

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


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear ramp from the one-worker rate to the worker-scaled rate, then constant."""

    def __init__(self, base: float, scaled: float, warmup_steps: int):
        self.base, self.scaled, self.warmup_steps = base, scaled, warmup_steps

    def __call__(self, step):
        if self.warmup_steps == 0:
            return tf.constant(self.scaled, tf.float32)
        progress = tf.minimum(tf.cast(step, tf.float32) / self.warmup_steps, 1.0)
        return self.base + (self.scaled - self.base) * progress

    def get_config(self):
        return {"base": self.base, "scaled": self.scaled, "warmup_steps": self.warmup_steps}


def build_inputs(config: TrainConfig) -> Dataset:
    return Dataset(InputConfig(data=config.data, image_size=config.image_size, batch_size=config.batch_size,
                               shuffle_buffer=config.shuffle_buffer, seed=config.seed, augment=config.augment))


def set_precision(config: TrainConfig) -> str:
    """The Keras dtype policy: float16 compute on GPUs, bfloat16 on CPUs, when asked for."""
    if not config.mixed_precision:
        policy = "float32"
    else:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def build_optimizer(config: TrainConfig, workers: dist.Workers, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    schedule = WarmupSchedule(config.lr, config.lr * workers.size, config.warmup_epochs * steps_per_epoch)
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def correct_in_top(probabilities: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    """How many labels are among the k most probable classes."""
    hits = tf.math.in_top_k(tf.cast(labels, tf.int32), probabilities, k)
    return tf.reduce_sum(tf.cast(hits, tf.float32))


class Trainer:
    def __init__(self, config: TrainConfig, workers: dist.Workers, metrics: TrainerMetrics | None = None):
        self.config = config
        self.workers = workers
        self.metrics = metrics
        self.data = build_inputs(config)
        self.steps_per_epoch = self.data.steps_per_epoch(workers.size)
        self.precision = set_precision(config)
        self.model = build_model(config.model, self.data.num_classes, config.image_size)
        self.optimizer = build_optimizer(config, workers, self.steps_per_epoch)
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy()
        dist.broadcast_from_chief(self.model.variables + self.optimizer.variables)
        self.train_stream = None

    def start_stream(self, epoch: int = 0) -> None:
        """Start reading the training data at `epoch`'s shard order (a resumed run continues it)."""
        self.train_stream = iter(self.data.train(self.workers.rank, self.workers.size, start_epoch=epoch))

    @tf.function
    def train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """One synchronous step; returns [loss, correct top-1, correct top-5] of this rank's batch."""
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = self.loss_fn(labels, probabilities)
            scaled = self.optimizer.scale_loss(loss)   # the loss itself unless loss scaling is on
        variables = self.model.trainable_variables
        gradients = dist.average(tape.gradient(scaled, variables))
        self.optimizer.apply_gradients(zip(gradients, variables))
        return tf.stack([loss, correct_in_top(probabilities, labels, 1), correct_in_top(probabilities, labels, 5)])

    @tf.function
    def eval_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        probabilities = self.model(images, training=False)
        return tf.stack([correct_in_top(probabilities, labels, 1), correct_in_top(probabilities, labels, 5),
                         tf.cast(tf.shape(labels)[0], tf.float32)])

    def train_epoch(self) -> tuple[float, float, float, float, float]:
        """(mean loss, top-1, top-5, images/s of this rank, data-wait share) over one epoch;
        the accuracies averaged over ranks."""
        sums = tf.zeros([3])
        started, waiting = time.perf_counter(), 0.0
        for _ in range(self.steps_per_epoch):
            asked = time.perf_counter()
            images, labels = self.next_batch()
            got = time.perf_counter()
            sums += self.train_step(images, labels)
            waiting += got - asked
            if self.metrics:
                self.metrics.record_step(self.config.batch_size, time.perf_counter() - asked, got - asked)
        seconds = time.perf_counter() - started
        self.sync_statistics()
        images_seen = self.steps_per_epoch * self.config.batch_size
        loss, top1, top5 = (dist.average([sums])[0] / [self.steps_per_epoch, images_seen, images_seen]).numpy()
        return float(loss), float(top1), float(top5), images_seen / seconds, waiting / seconds

    def next_batch(self) -> tuple[tf.Tensor, tf.Tensor]:
        with self.data.reader_errors():
            return next(self.train_stream)

    def sync_statistics(self) -> None:
        """Average the non-trained state (BatchNorm's moving statistics, updated from each rank's own
        batches) over the ranks, so that every rank evaluates and saves the same model. Integer state
        (dropout's random seed generators) is per rank by design and left alone."""
        variables = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        for variable, value in zip(variables, dist.average([v.value for v in variables])):
            variable.assign(value)

    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """Exact top-1, top-5 over the whole split: each rank counts its share, counts are summed."""
        counts = tf.zeros([3])
        with self.data.reader_errors():
            for images, labels in self.data.evaluate(split, self.workers.rank, self.workers.size):
                counts += self.eval_step(images, labels)
        top1, top5, seen = dist.total([counts])[0].numpy()
        return float(top1 / max(seen, 1)), float(top5 / max(seen, 1))

    def run_epoch(self, epoch: int) -> EpochResult:
        started = time.perf_counter()
        loss, train_top1, train_top5, rate, wait_share = self.train_epoch()
        val_top1, val_top5 = self.evaluate()
        result = EpochResult(epoch, loss, train_top1, train_top5, val_top1, val_top5, rate, wait_share,
                             time.perf_counter() - started)
        if self.metrics:
            accuracies = {("train", 1): train_top1, ("train", 5): train_top5, ("val", 1): val_top1, ("val", 5): val_top5}
            self.metrics.record_epoch(epoch, loss, accuracies, float(self.optimizer.learning_rate))
            self.metrics.record_reads(self.data.source.stats)
        if self.workers.is_chief:
            log.info("epoch %d: loss %.4f, train top-1 %.4f top-5 %.4f, val top-1 %.4f top-5 %.4f, "
                     "%.0f img/s per worker, %.1f%% waiting for data", epoch, loss, train_top1, train_top5,
                     val_top1, val_top5, rate, 100 * wait_share)
        return result

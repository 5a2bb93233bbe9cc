"""The training recipe's optimisation: the loss, the optimizer, the learning-rate schedule.

- Loss: cross-entropy on the softmax output; with label smoothing (Szegedy et al. 2016, "Rethinking
  the Inception Architecture"; ImageNet recipe: He et al. 2019, "Bag of Tricks") on one-hot labels,
  as Keras 3's SparseCategoricalCrossentropy has no `label_smoothing`. The model's regularisation
  losses (`model.losses`) are added in the train step (trainer.loop).
- Rate: `--lr` is one worker's rate; the peak rate is `lr x SCALINGS[rule](workers)`: linear for SGD
  (Goyal et al. 2017), square root for Adam and AdamW (Malladi et al. 2022, "On the SDEs and Scaling
  Rules for Adaptive Gradient Algorithms": Adam's step is normalised by the gradients' scale, so
  linear scaling overshoots once there are more than a few workers).
- Schedule: a linear warm-up from `lr` to the peak over `warmup_epochs`, times the decay of the named
  schedule (SCHEDULES). A pure function of the optimizer's iteration count, which the checkpoint
  holds, so a resumed run follows the same rates as an uninterrupted one.
- Weight decay: decoupled (Loshchilov & Hutter 2019; Keras 3's `weight_decay`: `w -= rate x wd x w`
  each step, outside the momentum), on kernels only: the 1-D variables, BatchNorm's gamma and beta
  (Goyal et al.) and the biases (He et al. 2019), are not decayed. An L2 term of strength lambda in the
  gradient of momentum-m SGD (Goyal et al.'s 1e-4) shrinks weights like a decoupled decay of
  lambda / (1 - m) (1e-3 at m = 0.9) once the momentum is in its steady state.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

STEP_DECAY = 0.1   # the rate's factor at each of --lr-decay-epochs

# Peak rate / one worker's rate, by rule, for a number of workers.
SCALINGS: dict[str, Callable[[int], float]] = {
    "linear": float,
    "sqrt": math.sqrt,
    "none": lambda workers: 1.0,
}


def _momentum_sgd(rate, weight_decay: float) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=weight_decay or None)


def _adam(rate, weight_decay: float) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(rate)   # the config refuses a weight decay with adam: that is adamw


def _adamw(rate, weight_decay: float) -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(rate, weight_decay=weight_decay)


BUILDERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "sgd": _momentum_sgd,
    "adam": _adam,
    "adamw": _adamw,
}


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """rate(step) = warm-up ramp(step) x decay(step), step = optimizer iterations done.

    The ramp goes linearly from `base` (one worker's rate) at step 0 to `peak` at `warmup_steps`,
    then stays at `peak`; the decay is SCHEDULES[name](step, self), 1 during the warm-up."""

    def __init__(self, name: str, base: float, peak: float, warmup_steps: int, total_steps: int,
                 decay_steps: tuple[int, ...] = ()):
        self.name, self.base, self.peak = name, base, peak
        self.warmup_steps, self.total_steps, self.decay_steps = warmup_steps, total_steps, tuple(decay_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.warmup_steps == 0:
            ramp = tf.constant(self.peak, tf.float32)
        else:
            ramp = self.base + (self.peak - self.base) * tf.minimum(step / self.warmup_steps, 1.0)
        return ramp * SCHEDULES[self.name](step, self)

    def get_config(self):
        return {"name": self.name, "base": self.base, "peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "decay_steps": list(self.decay_steps)}


def _constant(step: tf.Tensor, schedule: Schedule) -> tf.Tensor:
    return tf.ones_like(step)


def _cosine(step: tf.Tensor, schedule: Schedule) -> tf.Tensor:
    """Half a cosine from 1 at the end of the warm-up to 0 at the end of the last epoch."""
    span = max(schedule.total_steps - schedule.warmup_steps, 1)
    progress = tf.clip_by_value((step - schedule.warmup_steps) / span, 0.0, 1.0)
    return 0.5 * (1.0 + tf.cos(math.pi * progress))


def _step(step: tf.Tensor, schedule: Schedule) -> tf.Tensor:
    """x STEP_DECAY from each boundary on (the first step of each of --lr-decay-epochs)."""
    boundaries = tf.constant(schedule.decay_steps or [math.inf], tf.float32)
    passed = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32))
    return tf.pow(STEP_DECAY, passed)


SCHEDULES: dict[str, Callable[[tf.Tensor, Schedule], tf.Tensor]] = {
    "constant": _constant,
    "cosine": _cosine,
    "step": _step,
}


def peak_rate(config: TrainConfig, workers: int) -> float:
    """The rate after the warm-up (before any decay) on `workers` workers."""
    return config.lr * SCALINGS[config.lr_scaling](workers)


def build_schedule(config: TrainConfig, workers: int, steps_per_epoch: int) -> Schedule:
    """`steps_per_epoch`: the nominal one (Trainer.steps_per_epoch), the schedules' unit."""
    return Schedule(config.lr_schedule, config.lr, peak_rate(config, workers), config.warmup_epochs * steps_per_epoch,
                    config.epochs * steps_per_epoch, tuple(e * steps_per_epoch for e in config.lr_decay_epochs))


def build_optimizer(config: TrainConfig, workers: int, steps_per_epoch: int,
                    variables: list) -> keras.optimizers.Optimizer:
    """The configured optimizer over `variables` (the model's trainable ones), not yet built."""
    optimizer = BUILDERS[config.optimizer](build_schedule(config, workers, steps_per_epoch), config.weight_decay)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) < 2])
    log.info("%s: rate %g for one worker, %g on %d (%s scaling) after %d warm-up epochs, %s schedule; "
             "weight decay %g, label smoothing %g", config.optimizer, config.lr, peak_rate(config, workers), workers,
             config.lr_scaling, config.warmup_epochs, config.lr_schedule, config.weight_decay, config.label_smoothing)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_loss(config: TrainConfig, num_classes: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """loss(integer labels, softmax probabilities): the batch's mean cross-entropy."""
    if not config.label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    return lambda labels, probabilities: smoothed(tf.one_hot(labels, num_classes), probabilities)

"""Exact top-k accuracy, shared by training (each rank counts its share) and `trainer.evaluate`.

A label is in the top k exactly when `tf.math.top_k` ranks it there: ties are broken by class
index (the lower index first), so never more than k classes count. `tf.math.in_top_k` counts every
class tied at the k-th place, which gave a collapsed model (uniform or NaN outputs) top-5 = 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf


@dataclass(frozen=True)
class Accuracy:
    top1: float
    top5: float
    seen: int        # samples evaluated
    expected: int    # samples the manifest lists for the split
    non_finite: int = 0   # samples whose predicted probabilities hold a NaN or an infinity

    @property
    def exact(self) -> bool:
        """Every sample of the split was evaluated (none skipped as unreadable or undecodable)."""
        return self.seen == self.expected


def top_k_hits(probabilities: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    """How many labels are among the k classes `tf.math.top_k` ranks first (float32 count)."""
    k = min(k, probabilities.shape[-1])
    top = tf.math.top_k(probabilities, k=k).indices
    hits = tf.reduce_any(tf.equal(top, tf.cast(labels, tf.int32)[:, None]), axis=1)
    return tf.reduce_sum(tf.cast(hits, tf.float32))


def eval_step(model: keras.Model):
    """A compiled step: [correct top-1, correct top-5, samples, samples with non-finite outputs] of one batch."""

    @tf.function
    def step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        probabilities = model(images, training=False)
        broken = tf.logical_not(tf.reduce_all(tf.math.is_finite(probabilities), axis=1))
        return tf.stack([top_k_hits(probabilities, labels, 1), top_k_hits(probabilities, labels, 5),
                         tf.cast(tf.shape(labels)[0], tf.float32), tf.reduce_sum(tf.cast(broken, tf.float32))])

    return step


def count(step, batches, progress=None) -> tf.Tensor:
    """Summed [top-1 hits, top-5 hits, samples, non-finite outputs] over the batches; `progress()`
    is called after each one."""
    counts = tf.zeros([4])
    for images, labels in batches:
        counts += step(images, labels)
        if progress:
            progress()
    return counts


def accuracy(counts, expected: int) -> Accuracy:
    """From summed counts and the number of samples the split should have had."""
    top1, top5, seen, non_finite = (float(c) for c in counts)
    return Accuracy(top1 / max(seen, 1), top5 / max(seen, 1), int(seen), expected, int(non_finite))

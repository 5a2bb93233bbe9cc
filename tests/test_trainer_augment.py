"""The batched augmentation (trainer.augment) against its per-image definition, its distribution,
and its determinism; the input pipeline's share of the cores."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.augment import PRESETS, AugmentConfig, augment_batch, draws, jitter, jitter_factors, pad_crop_flip
from trainer.data import available_cpus, thread_share


def _images(batch=16, size=12, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3)), tf.uint8)


def _per_image(image, offset, flip, pad):
    """The definition: reflect-pad, crop at the offset, flip (what tf.image.random_crop would crop)."""
    size = image.shape[0]
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    crop = padded[offset[0]:offset[0] + size, offset[1]:offset[1] + size]
    return tf.image.flip_left_right(crop) if flip else crop


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_batched_pad_crop_flip_is_the_per_image_definition(pad):
    images = _images()
    config = AugmentConfig(crop="pad", pad=pad)
    offsets, flips = draws(16, tf.constant([1, 2], tf.int64), tf.constant([3, 4], tf.int64), config)
    batched = pad_crop_flip(images, offsets, flips, pad).numpy()
    for i in range(16):
        expected = _per_image(images[i], offsets[i].numpy(), bool(flips[i]), pad)
        np.testing.assert_array_equal(batched[i], expected)


def test_crops_and_flips_are_uniform_like_the_per_image_ops():
    config = AugmentConfig(crop="pad", pad=4)
    counts, flipped, total = np.zeros(9), 0, 0
    for step in range(200):
        offsets, flips = draws(64, tf.constant([step, 1], tf.int64), tf.constant([step, 2], tf.int64), config)
        counts += np.bincount(offsets.numpy().ravel(), minlength=9)
        flipped, total = flipped + int(tf.reduce_sum(tf.cast(flips, tf.int32))), total + 64
    # 25,600 offsets over 0..8: each value's share within 10% of 1/9 (about 8 standard deviations).
    assert counts.sum() == 2 * total and np.all(np.abs(counts / counts.sum() - 1 / 9) < 0.1 / 9)
    assert abs(flipped / total - 0.5) < 0.02


def test_without_flip_nothing_is_flipped_and_resized_crops_are_only_flipped():
    images = _images()
    seed = tf.constant([5, 6], tf.int64)
    unflipped = AugmentConfig(crop="resized", flip=False)
    np.testing.assert_array_equal(augment_batch(images, seed, unflipped), images)
    flipped = augment_batch(images, seed, AugmentConfig(crop="resized", flip=True)).numpy()
    for i in range(16):
        assert (np.array_equal(flipped[i], images[i]) or
                np.array_equal(flipped[i], tf.image.flip_left_right(images[i])))


def test_batched_jitter_is_the_per_image_definition():
    images = _images(batch=8, size=16, seed=1)
    seed, strength = tf.constant([7, 8], tf.int64), 0.4
    delta, contrast, saturation = (v.numpy() for v in jitter_factors(8, seed, strength))
    batched = jitter(images, seed, strength).numpy().astype(int)
    for i in range(8):
        image = tf.image.convert_image_dtype(images[i], tf.float32)
        image = tf.image.adjust_brightness(image, delta[i])
        image = tf.image.adjust_contrast(image, contrast[i])
        image = tf.image.adjust_saturation(tf.clip_by_value(image, 0.0, 1.0), saturation[i])
        expected = tf.image.convert_image_dtype(tf.clip_by_value(image, 0.0, 1.0), tf.uint8, saturate=True)
        assert np.abs(batched[i] - expected.numpy().astype(int)).max() <= 1


def test_the_same_seed_gives_the_same_batch_eagerly_traced_and_under_xla():
    images = _images()
    config = AugmentConfig(**{**PRESETS["tinyimagenet"].__dict__, "color_jitter": 0.3})
    seed = tf.constant([11, 12], tf.int64)
    eager = augment_batch(images, seed, config).numpy()
    traced = tf.function(lambda x, s: augment_batch(x, s, config))(images, seed).numpy()
    compiled = tf.function(lambda x, s: augment_batch(x, s, config), jit_compile=True)(images, seed).numpy()
    np.testing.assert_array_equal(eager, traced)
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1   # XLA may fuse the float math
    assert not np.array_equal(eager, augment_batch(images, tf.constant([11, 13], tf.int64), config))


def test_disabled_augmentation_leaves_the_batch_alone():
    images = _images()
    np.testing.assert_array_equal(augment_batch(images, tf.constant([1, 1], tf.int64), PRESETS["none"]), images)


def test_ranks_on_one_node_split_its_cores(monkeypatch):
    cpus = available_cpus()
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")   # what horovodrun and trainer.launch set
    assert thread_share() == max(1, cpus // 2)
    monkeypatch.delenv("HOROVOD_LOCAL_SIZE")
    assert thread_share() == cpus
    assert thread_share(local_size=cpus * 4) == 1

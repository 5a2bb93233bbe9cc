"""Decode and augment JPEG bytes with TensorFlow ops, into uint8 RGB images of the model's size.

The model scales them itself (trainer.models.classifier), so the saved model takes what this makes.
Every random op is stateless and takes its seed from the element, so a seeded, deterministic
pipeline gives the same images in the same order however many parallel calls run.
"""
from __future__ import annotations

import tensorflow as tf

from .config import AUGMENT_PRESETS as PRESETS
from .config import AugmentConfig, preset_for

# The augmentation settings live with the rest of the configuration (importable without TensorFlow).
__all__ = ["AugmentConfig", "PRESETS", "preset_for", "eval_image", "train_image"]


def eval_image(jpeg: tf.Tensor, size: int, config: AugmentConfig) -> tf.Tensor:
    """The image as evaluation sees it: the central crop (eval_crop), resized; uint8."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    if config.eval_crop < 1.0:
        image = tf.image.central_crop(image, config.eval_crop)
    return _resize(image, size)


def train_image(jpeg: tf.Tensor, seed: tf.Tensor, size: int, config: AugmentConfig) -> tf.Tensor:
    """One augmented training image (uint8); `seed` is a shape [2] int tensor unique to the element."""
    if not config.enabled:
        return eval_image(jpeg, size, config)
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = _CROPPERS[config.crop](jpeg, crop_seed, size, config)
    if config.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if config.color_jitter:
        image = _jitter(image, jitter_seed, config.color_jitter)
    return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """To size x size; a no-op (no resampling) when the image already is."""
    shape = tf.shape(image)
    return tf.cond(tf.logical_and(shape[0] == size, shape[1] == size),
                   lambda: image,
                   lambda: tf.cast(tf.clip_by_value(tf.image.resize(image, [size, size], antialias=True), 0, 255),
                                   tf.uint8))


def _pad_crop(jpeg, seed, size: int, config: AugmentConfig) -> tf.Tensor:
    image = _resize(tf.io.decode_jpeg(jpeg, channels=3), size)
    padded = tf.pad(image, [[config.pad, config.pad], [config.pad, config.pad], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(padded, [size, size, 3], seed)


def _resized_crop(jpeg, seed, size: int, config: AugmentConfig) -> tf.Tensor:
    """Random-resized-crop that decodes only the crop window (decode_and_crop_jpeg)."""
    shape = tf.io.extract_jpeg_shape(jpeg)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=config.aspect_range, area_range=config.area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    image = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([offset_y, offset_x, height, width]), channels=3)
    return _resize(image, size)


def _whole(jpeg, seed, size: int, config: AugmentConfig) -> tf.Tensor:
    return _resize(tf.io.decode_jpeg(jpeg, channels=3), size)


_CROPPERS = {"pad": _pad_crop, "resized": _resized_crop, "none": _whole}


def _jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.stateless_random_brightness(image, strength * 0.5, seeds[0])
    image = tf.image.stateless_random_contrast(image, 1 - strength, 1 + strength, seeds[1])
    image = tf.image.stateless_random_saturation(image, 1 - strength, 1 + strength, seeds[2])
    return tf.image.convert_image_dtype(tf.clip_by_value(image, 0.0, 1.0), tf.uint8, saturate=True)

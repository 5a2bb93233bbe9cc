"""Augmentation, split where it is cheapest: per image only what must be (decode; for
random-resized-crop `decode_and_crop_jpeg` and the resize the crop needs), the rest on whole
batches (pad-crop, flip, colour jitter), which the train step runs on the accelerator.

Every random draw is stateless and seeded: per image from (the epoch's seed, the image's place in
the epoch), per batch from (the epoch's seed, the step). So a seeded run draws the same crops and
flips however many parallel calls run, and a resumed run the same as the whole run.

The batched ops are the per-image definitions applied to every image with its own draws (tested:
`pad_crop_flip` equals `tf.pad(REFLECT)` + a crop + a flip per image; `jitter` equals
`tf.image.adjust_brightness/contrast/saturation` per image). Images stay uint8 (the model scales
them: trainer.models.classifier), so a batch is a quarter of float32's bytes to copy to a GPU.
"""
from __future__ import annotations

import tensorflow as tf

from .config import AUGMENT_PRESETS as PRESETS
from .config import AugmentConfig, preset_for

# The augmentation settings live with the rest of the configuration (importable without TensorFlow).
# One named algorithm: "auto_select" may pick another under XLA (--jit-compile) and change the draws.
ALG = "philox"
Size = tuple[int, int]   # (height, width)
__all__ = ["AugmentConfig", "PRESETS", "preset_for", "eval_image", "train_image", "augment_batch",
           "per_image_seeds"]


def eval_image(jpeg: tf.Tensor, size: int, config: AugmentConfig, stored: Size | None = None) -> tf.Tensor:
    """The image as evaluation sees it: the central crop (eval_crop), resized; uint8. `stored`: the
    (height, width) of every image of the split, when the manifest knows it."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    if config.eval_crop < 1.0:
        image, stored = tf.image.central_crop(image, config.eval_crop), None
    return _resize(image, size, stored)


def per_image_seeds(config: AugmentConfig) -> bool:
    """Whether `train_image` draws per image (and needs a seed per image)."""
    return config.enabled and config.crop == "resized"


def train_image(jpeg: tf.Tensor, seed: tf.Tensor | None, size: int, config: AugmentConfig,
                stored: Size | None = None) -> tf.Tensor:
    """A training image's per-image part (uint8): the random-resized-crop, decoded from the crop window
    only (`seed`: a shape [2] int tensor unique to the image), or the whole image at the model's size
    (`stored` as in eval_image). `augment_batch` does the rest on the batch."""
    if per_image_seeds(config):
        return _resized_crop(jpeg, seed, size, config)
    return _resize(tf.io.decode_jpeg(jpeg, channels=3), size, stored)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """The batched part of training augmentation on uint8 images [batch, size, size, 3]: pad-crop
    (crop="pad") and flip as one gather, then colour jitter. `seed`: shape [2] int, one per batch."""
    if not config.enabled:
        return images
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg=ALG))
    pad = config.pad if config.crop == "pad" else 0
    if pad or config.flip:
        offsets, flips = draws(tf.shape(images)[0], crop_seed, flip_seed, config)
        images = pad_crop_flip(images, offsets, flips, pad)
    if config.color_jitter:
        images = jitter(images, jitter_seed, config.color_jitter)
    return images


def draws(batch: tf.Tensor, crop_seed: tf.Tensor, flip_seed: tf.Tensor,
          config: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Per image: the crop's offset in the padded image, [batch, 2] (row, column), uniform in
    0..2 pad as `tf.image.random_crop`'s; whether it is flipped, [batch], with probability 1/2."""
    pad = config.pad if config.crop == "pad" else 0
    offsets = tf.random.stateless_uniform([batch, 2], crop_seed, 0, 2 * pad + 1, dtype=tf.int32, alg=ALG)
    flips = tf.random.stateless_uniform([batch], flip_seed, 0, 2, dtype=tf.int32, alg=ALG) > 0
    if not config.flip:
        flips = tf.zeros_like(flips)
    return offsets, flips


def pad_crop_flip(images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor, pad: int) -> tf.Tensor:
    """Each image reflection-padded by `pad`, cropped back to its size at `offsets` and flipped
    left-right where `flips`; without materialising the padding: every output pixel's source
    pixel is computed (reflected indices) and all are gathered at once."""
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    rows = _reflect(offsets[:, :1] + tf.range(height)[None] - pad, height)            # [batch, height]
    columns = _reflect(offsets[:, 1:] + tf.range(width)[None] - pad, width)           # [batch, width]
    columns = tf.where(flips[:, None], tf.reverse(columns, [1]), columns)
    index = (tf.range(batch)[:, None, None] * height + rows[:, :, None]) * width + columns[:, None, :]
    return tf.reshape(tf.gather(tf.reshape(images, [-1, 3]), index), shape)


def _reflect(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """tf.pad's REFLECT mode as an index map: -1 -> 1, size -> size - 2 (pad < size)."""
    index = tf.abs(index)
    return tf.where(index >= size, 2 * (size - 1) - index, index)


def jitter_factors(batch: tf.Tensor, seed: tf.Tensor, strength: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per image: brightness delta in +-strength/2, contrast and saturation factors in 1 +- strength
    (the ranges of tf.image.stateless_random_brightness/contrast/saturation)."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg=ALG))
    delta = _uniform([batch], seeds[0], -strength * 0.5, strength * 0.5)
    contrast = _uniform([batch], seeds[1], 1 - strength, 1 + strength)
    saturation = _uniform([batch], seeds[2], 1 - strength, 1 + strength)
    return delta, contrast, saturation


def _uniform(shape, seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """Floats in [low, high) from integer draws: XLA's float stateless_uniform draws other values than
    the CPU kernel's for the same seed; its integer draws are the same."""
    steps = tf.random.stateless_uniform(shape, seed, 0, 1 << 24, dtype=tf.int32, alg=ALG)
    return low + (high - low) * tf.cast(steps, tf.float32) / float(1 << 24)


def jitter(images: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Brightness, contrast, then saturation, each with its own factor per image, in float, back to uint8."""
    delta, contrast, saturation = jitter_factors(tf.shape(images)[0], seed, strength)
    image = tf.image.convert_image_dtype(images, tf.float32) + delta[:, None, None, None]
    mean = tf.reduce_mean(image, axis=[1, 2], keepdims=True)
    image = (image - mean) * contrast[:, None, None, None] + mean
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(image, 0.0, 1.0))
    hue, value_saturation, value = tf.unstack(hsv, axis=-1)
    value_saturation = tf.clip_by_value(value_saturation * saturation[:, None, None], 0.0, 1.0)
    image = tf.image.hsv_to_rgb(tf.stack([hue, value_saturation, value], axis=-1))
    return tf.image.convert_image_dtype(tf.clip_by_value(image, 0.0, 1.0), tf.uint8, saturate=True)


def _resize(image: tf.Tensor, size: int, stored: Size | None = None) -> tf.Tensor:
    """To size x size; a no-op (no resampling) when the image already is. With `stored` known the
    choice is made here, not per image: the per-image tf.cond cost 10% of the pipeline at 64 px."""
    def resampled() -> tf.Tensor:
        return tf.cast(tf.clip_by_value(tf.image.resize(image, [size, size], antialias=True), 0, 255), tf.uint8)

    if stored is None:
        shape = tf.shape(image)
        resized = tf.cond(tf.logical_and(shape[0] == size, shape[1] == size), lambda: image, resampled)
    else:
        resized = image if tuple(stored) == (size, size) else resampled()
    return tf.ensure_shape(resized, [size, size, 3])


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

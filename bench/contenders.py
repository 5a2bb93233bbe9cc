"""The contenders of bench.pipeline, each a tf.data stream of uint8 batches over the same images:
the project's pipeline is trainer.data's; these are the baselines (see bench.pipeline)."""
from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
import webdataset

from trainer.augment import per_image_seeds, train_image
from trainer.data import AUTOTUNE, Dataset, InputConfig

# The baselines hold their images in memory; this many bytes of JPEGs is plenty for a rate.
BASELINE_BYTES = 256 << 20


def images_per_second(iterator, batch_size: int, seconds: float) -> float:
    """Batches drawn for `seconds` after a warm-up of a few batches."""
    for _ in range(3):
        next(iterator)
    started, batches = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        next(iterator)
        batches += 1
    return batches * batch_size / (time.perf_counter() - started)


def in_memory_samples(data: Dataset, split: str) -> tuple[list[bytes], list[int]]:
    """The JPEGs and labels of the split's first shards, up to BASELINE_BYTES."""
    images, labels, total = [], [], 0
    for shard in data.manifest["splits"][split]["shards"]:
        blob, offsets, lengths, classes = data.source.samples(shard["name"])
        images += [blob[o:o + n] for o, n in zip(offsets, lengths)]
        labels += classes.tolist()
        total += shard["bytes"]
        if total >= BASELINE_BYTES:
            break
    return images, labels


def augmented(samples: tf.data.Dataset, config: InputConfig, stored: tuple[int, int] | None) -> tf.data.Dataset:
    """The pipeline's own per-image work + batch, applied to a baseline's sample stream; `stored`:
    the split's one image size, when the manifest records it (then 64 px is decode_jpeg alone)."""
    size, augment = config.image_size, config.augment
    if per_image_seeds(augment):   # random-resized-crop: a seed per image
        seeds = tf.data.Dataset.random(seed=0).batch(2)
        decoded = tf.data.Dataset.zip((samples, seeds)).map(
            lambda sample, s: (train_image(sample[0], s, size, augment), sample[1]),
            num_parallel_calls=AUTOTUNE, deterministic=False)
    else:
        decoded = samples.map(lambda jpeg, label: (train_image(jpeg, None, size, augment, stored), label),
                              num_parallel_calls=AUTOTUNE, deterministic=False)
    return decoded.batch(config.batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def write_tfrecords(images: list[bytes], labels: list[int], directory: str, files: int = 8) -> list[str]:
    paths = [os.path.join(directory, f"part-{i:03d}.tfrecord") for i in range(files)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for index, (image, label) in enumerate(zip(images, labels)):
        example = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
        writers[index % files].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    return paths


def tfrecord_samples(paths: list[str], shuffle_buffer: int) -> tf.data.Dataset:
    """The TFRecord files' (jpeg, label) samples, shuffled in a buffer of `shuffle_buffer` samples."""
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return example["image"], tf.cast(example["label"], tf.int32)

    files = tf.data.Dataset.from_tensor_slices(paths).repeat()
    return (files.interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=4, deterministic=False)
            .map(parse, num_parallel_calls=AUTOTUNE).shuffle(shuffle_buffer))


def stock_webdataset(data: Dataset, config: InputConfig, shuffle_buffer: int) -> tf.data.Dataset | None:
    """The split's shards through the `webdataset` library as its documentation shows, into tf.data;
    None when the shards are not on local disk."""
    if "file" not in np.atleast_1d(data.source.fs.protocol):
        return None
    urls = [f"{data.source.root}/{name}" for name in data._shard_names("train")]
    samples = webdataset.WebDataset(urls, shardshuffle=len(urls), empty_check=False).repeat().shuffle(
        min(shuffle_buffer, 20_000)).decode("rgb8").to_tuple("jpg", "cls")
    spec = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32))
    images = tf.data.Dataset.from_generator(lambda: iter(samples), output_signature=spec)
    size, augment = config.image_size, config.augment

    def per_image(image, label):
        if per_image_seeds(augment):   # random-resized-crop of the decoded image
            begin, crop, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(image), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), min_object_covered=0.1,
                aspect_ratio_range=augment.aspect_range, area_range=augment.area_range, max_attempts=10,
                use_image_if_no_bounding_boxes=True)
            image = tf.slice(image, begin, crop)
        resized = tf.image.resize(image, [size, size], antialias=True)
        return tf.cast(tf.clip_by_value(resized, 0, 255), tf.uint8), label

    return images.map(per_image, num_parallel_calls=AUTOTUNE).batch(
        config.batch_size, drop_remainder=True).prefetch(AUTOTUNE)

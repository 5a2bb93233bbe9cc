"""The streaming input pipeline against two baselines measured in the same run, on the same images:

- decode limit: the per-image work alone (`trainer.augment.train_image`: decode, or for
  random-resized-crop decode_and_crop + resize) over the JPEG bytes held in memory, uint8, batched;
- TFRecord: the same images written as TFRecord files (local disk) and read by TFRecordDataset
  with the same per-image work: the incumbent TensorFlow way;
- stock WebDataset: what a user would write with the `webdataset` library over the same shards
  (`WebDataset(urls).shuffle(n).decode("rgb8")` -> `tf.data.Dataset.from_generator`, then the same
  crop / resize per image): the peer (local shards only: it reads URLs, not fsspec stores).

Every contender stops at uint8 batches: the batched augmentation runs in the train step, on the
accelerator (trainer.augment.augment_batch).

    python -m bench.pipeline --data URL [--split train] [--batch-size 256] [--seconds 10] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import webdataset

from trainer.augment import PRESETS, per_image_seeds, train_image
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


def augmented(samples: tf.data.Dataset, config: InputConfig) -> tf.data.Dataset:
    """The pipeline's own per-image work + batch, applied to a baseline's sample stream."""
    size, augment = config.image_size, config.augment
    if per_image_seeds(augment):   # random-resized-crop: a seed per image
        seeds = tf.data.Dataset.random(seed=0).batch(2)
        decoded = tf.data.Dataset.zip((samples, seeds)).map(
            lambda sample, s: (train_image(sample[0], s, size, augment), sample[1]),
            num_parallel_calls=AUTOTUNE, deterministic=False)
    else:
        decoded = samples.map(lambda jpeg, label: (train_image(jpeg, None, size, augment), label),
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict:
    config = InputConfig(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                         shuffle_mb=args.shuffle_mb, augment=PRESETS[args.augment])
    data = Dataset(config)
    shuffle_buffer = data.shuffle_samples("train")
    if args.split != "train":
        raise ValueError("only the train split streams with augmentation; use --split train")
    rss_before = peak_rss_mb()
    streams = {"pipeline": iter(data.train(0, 1, 0, 10_000))}   # as training reads it, epoch after epoch
    rates: dict[str, list[float]] = {"pipeline": [images_per_second(streams["pipeline"], config.batch_size,
                                                                    args.seconds)]}
    rss_pipeline = peak_rss_mb()   # before the baselines load their images into memory
    images, labels = in_memory_samples(data, args.split)
    in_memory = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    streams["decode_limit"] = iter(augmented(in_memory, config))
    with tempfile.TemporaryDirectory() as directory:
        paths = write_tfrecords(images, labels, directory)
        streams["tfrecord"] = iter(augmented(tfrecord_samples(paths, shuffle_buffer), config))
        stock = stock_webdataset(data, config, shuffle_buffer)
        if stock is not None:
            streams["stock_webdataset"] = iter(stock)
        # Rounds alternate the contenders, so drift of the machine's speed reaches all of them alike.
        for round_ in range(args.rounds):
            for name, stream in streams.items():
                if round_ or name != "pipeline":
                    rates.setdefault(name, []).append(images_per_second(stream, config.batch_size, args.seconds))
    median = {name: float(np.median(values)) for name, values in rates.items()}
    pipeline, decode_limit, tfrecord = median["pipeline"], median["decode_limit"], median["tfrecord"]
    stock = median.get("stock_webdataset")
    return {
        "data": args.data,
        "train_samples": data.samples("train"),
        "image_size": config.image_size,
        "mean_jpeg_bytes": round(float(np.mean([len(i) for i in images]))),
        "pipeline_images_per_s": round(pipeline),
        "decode_limit_images_per_s": round(decode_limit),
        "tfrecord_images_per_s": round(tfrecord),
        "pipeline_vs_decode_limit": round(pipeline / decode_limit, 2),
        "pipeline_vs_tfrecord": round(pipeline / tfrecord, 2),
        "stock_webdataset_images_per_s": round(stock) if stock else None,
        "pipeline_vs_stock_webdataset": round(pipeline / stock, 2) if stock else None,
        "peak_rss_mb_before_pipeline": round(rss_before),
        "peak_rss_mb_after_pipeline": round(rss_pipeline),
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset URL (the --output of ingest.shard)")
    parser.add_argument("--split", default="train", help="split to stream (default train)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--image-size", type=int, default=64, help="model input side (default 64)")
    parser.add_argument("--augment", default="tinyimagenet", choices=sorted(PRESETS),
                        help="augmentation preset (default tinyimagenet)")
    parser.add_argument("--shuffle-mb", type=int, default=128, help="shuffle buffer, MB (default 128)")
    parser.add_argument("--seconds", type=float, default=10,
                        help="measuring time per contender and round (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each measuring every contender in turn; medians are reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"pipeline {result['pipeline_images_per_s']} img/s; decode limit {result['decode_limit_images_per_s']} "
          f"({result['pipeline_vs_decode_limit']}x); TFRecord {result['tfrecord_images_per_s']} "
          f"({result['pipeline_vs_tfrecord']}x); stock WebDataset {result['stock_webdataset_images_per_s']} "
          f"({result['pipeline_vs_stock_webdataset']}x); peak RSS {result['peak_rss_mb_after_pipeline']} MB")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

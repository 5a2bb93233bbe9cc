"""The streaming input pipeline against two baselines measured in the same run, on the same images:

- decode limit: the per-image work alone (`trainer.augment.train_image`: decode_jpeg when the
  manifest says every image already has the model's size, decode + resize otherwise, or for
  random-resized-crop decode_and_crop + resize) over the JPEG bytes held in memory, uint8, batched;
- TFRecord: the same images written as TFRecord files (local disk) and read by TFRecordDataset
  with the same per-image work: the incumbent TensorFlow way;
- stock WebDataset: what a user would write with the `webdataset` library over the same shards
  (`WebDataset(urls).shuffle(n).decode("rgb8")` -> `tf.data.Dataset.from_generator`, then the same
  crop / resize per image): the peer (local shards only: it reads URLs, not fsspec stores).

Every contender stops at uint8 batches: the batched augmentation runs in the train step, on the
accelerator (trainer.augment.augment_batch).

    python -m bench.pipeline --data URL [--s3] [--batch-size 256] [--seconds 10] [--rounds 3] [--json]

With --s3 the shards at --data (a local directory) are first copied to a bucket on a local
moto_server (bench.moto_ranged) and the pipeline reads them from there; the baselines read
local disk, and the server's CPU is taken from the pipeline's share of the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
from pathlib import Path

from ingest import cli
from ingest.errors import InputError
from ingest.manifest import load_manifest
from ingest.storage import Location
from trainer.config import AUGMENT_PRESETS

from .servers import upload

def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds > 0")
    return value


def per_image_work(config, stored: tuple[int, int] | None) -> str:
    """What the decode limit does per image: the pipeline's unavoidable work."""
    if config.augment.enabled and config.augment.crop == "resized":
        return "decode_and_crop_jpeg + resize"
    if stored == (config.image_size, config.image_size):
        return "decode_jpeg"
    return "decode_jpeg + resize" if stored else "decode_jpeg + resize where the size differs (tf.cond)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace, local: str) -> dict:
    """The contenders' rates; the pipeline reads args.data, the baselines `local` (the same shards)."""
    import dataclasses
    import tempfile

    import numpy as np

    from trainer.quiet import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    from trainer.data import Dataset, InputConfig

    from .contenders import (augmented, images_per_second, in_memory_samples, stock_webdataset,
                             tfrecord_samples, write_tfrecords)

    config = InputConfig(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                         shuffle_mb=args.shuffle_mb, augment=AUGMENT_PRESETS[args.augment])
    data = Dataset(config)
    local_data = Dataset(dataclasses.replace(config, data=local)) if local != args.data else data
    shuffle_buffer = data.shuffle_samples("train")
    stored = data.image_size("train")
    rss_before = peak_rss_mb()
    streams = {"pipeline": iter(data.train(0, 1, 0, 10_000))}   # as training reads it, epoch after epoch
    rates: dict[str, list[float]] = {"pipeline": [images_per_second(streams["pipeline"], config.batch_size,
                                                                    args.seconds)]}
    rss_pipeline = peak_rss_mb()   # before the baselines load their images into memory
    images, labels = in_memory_samples(local_data, "train")
    in_memory = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    streams["decode_limit"] = iter(augmented(in_memory, config, stored))
    with tempfile.TemporaryDirectory() as directory:
        paths = write_tfrecords(images, labels, directory)
        streams["tfrecord"] = iter(augmented(tfrecord_samples(paths, shuffle_buffer), config, stored))
        stock = stock_webdataset(local_data, config, shuffle_buffer)
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
        "per_image_work": per_image_work(config, stored),
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
    parser.add_argument("--s3", action="store_true",
                        help="stream the pipeline from a local moto_server bucket holding a copy of --data")
    parser.add_argument("--batch-size", type=cli.positive, default=256, help="batch size (default 256)")
    parser.add_argument("--image-size", type=cli.positive, default=64, help="model input side (default 64)")
    parser.add_argument("--augment", default="tinyimagenet", choices=sorted(AUGMENT_PRESETS),
                        help="augmentation preset (default tinyimagenet)")
    parser.add_argument("--shuffle-mb", type=cli.positive, default=128, help="shuffle buffer, MB (default 128)")
    parser.add_argument("--seconds", type=seconds, default=10,
                        help="measuring time per contender and round (default 10)")
    parser.add_argument("--rounds", type=cli.positive, default=3,
                        help="rounds, each measuring every contender in turn; medians are reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    return cli.run_main(lambda: measure(args), kept="nothing is written")


def measure(args: argparse.Namespace) -> int:
    fs, root = Location(args.data).open()
    load_manifest(fs, root)   # a dataset, or one line saying why not (before any server starts)
    with contextlib.ExitStack() as stack:
        local = args.data
        if args.s3:
            if "file" not in fs.protocol:
                raise InputError(f"--s3 copies a local dataset to the bucket; {args.data} is not on local disk")
            args.data = upload(stack, Path(root), "s3://bench/shards")
        result = run(args, local)
    print(f"pipeline {result['pipeline_images_per_s']} img/s; decode limit {result['decode_limit_images_per_s']} "
          f"({result['pipeline_vs_decode_limit']}x); TFRecord {result['tfrecord_images_per_s']} "
          f"({result['pipeline_vs_tfrecord']}x); stock WebDataset {result['stock_webdataset_images_per_s']} "
          f"({result['pipeline_vs_stock_webdataset']}x); peak RSS {result['peak_rss_mb_after_pipeline']} MB")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

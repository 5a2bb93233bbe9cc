"""Soak the trainer's input pipeline: many epochs of training batches and evaluation passes through
one process, watching its resident memory, open file descriptors and threads after every epoch.

    python -m bench.soak [--data URL] [--epochs 10] [--json]

Without --data it builds its own: a synthetic TinyImageNet-layout set, ingested into a bucket of a
moto_server started on 127.0.0.1 (the S3 path: s3fs, aiohttp connections, retries). Streaming must
hold memory flat and leak neither handles nor threads, however many epochs run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .servers import S3_TEST_ENV, moto_server


@dataclass
class Sample:
    epoch: int
    seconds: float
    images: int
    rss_mb: float
    fds: int
    threads: int


def process_state() -> tuple[float, int, int]:
    """(resident MB, open file descriptors, OS threads) of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(status["VmRSS"].split()[0]) / 1024, len(os.listdir("/proc/self/fd")), int(status["Threads"]))


@contextlib.contextmanager
def generated_dataset(classes: int, per_class: int) -> Iterator[str]:
    """A synthetic set ingested into a fresh moto_server bucket; yields its s3:// URL."""
    import boto3

    from ingest import synth
    from ingest.shard import main as shard_main

    with tempfile.TemporaryDirectory() as scratch, moto_server() as endpoint:
        os.environ.update({**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint})
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="soak")
        synth.generate(f"{scratch}/tiny", classes=classes, train_per_class=per_class, val_per_class=per_class // 10,
                       seed=0)
        url = "s3://soak/shards"
        if shard_main(["--input", f"{scratch}/tiny", "--output", url, "--shard-size", "500", "--log-level",
                       "WARNING"]) != 0:
            raise RuntimeError("ingest of the soak data set failed")
        yield url


def soak(url: str, epochs: int, batch_size: int) -> list[Sample]:
    from trainer.data import Dataset, InputConfig

    dataset = Dataset(InputConfig(data=url, batch_size=batch_size))
    stream = iter(dataset.train(0, 1, 0, epochs))
    samples = [Sample(-1, 0.0, 0, *process_state())]
    for epoch in range(epochs):
        started = time.perf_counter()
        steps = dataset.steps_in_epoch(epoch, 1)
        for _ in range(steps):
            next(stream)
        evaluated = sum(len(labels) for _, labels in dataset.evaluate("val"))
        samples.append(Sample(epoch, time.perf_counter() - started, steps * batch_size + evaluated, *process_state()))
        print(f"epoch {epoch}: {samples[-1]}", file=sys.stderr, flush=True)
    dataset.source.check()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset URL (default: a generated set in a local moto_server bucket)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to stream (default 10)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--classes", type=int, default=50, help="classes of the generated set (default 50)")
    parser.add_argument("--per-class", type=int, default=200, help="train images per class of the generated set "
                        "(default 200; a tenth as many val images)")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON on the last line")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.data or stack.enter_context(generated_dataset(args.classes, args.per_class))
        samples = soak(url, args.epochs, args.batch_size)
    print(f"{'epoch':>5} {'s':>6} {'images':>7} {'RSS MB':>7} {'fds':>4} {'threads':>7}")
    for s in samples:
        print(f"{s.epoch:>5} {s.seconds:>6.1f} {s.images:>7} {s.rss_mb:>7.0f} {s.fds:>4} {s.threads:>7}")
    if args.json:
        print(json.dumps([asdict(s) for s in samples]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

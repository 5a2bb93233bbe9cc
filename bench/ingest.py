"""Ingest throughput against the I/O limit measured in the same run.

The I/O limit is plain `tar` of the same input files to the same destination (for S3: tar's
output streamed into one object through the same fsspec client). Ingest runs as a user runs it
(`python -m ingest.shard`, start-up and listing included) on input that needs no re-encoding.

    python -m bench.ingest [--classes 200 --train-per-class 250 --size 64] [--processes 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import fsspec

from ingest import synth

from .servers import S3_TEST_ENV, moto_server

CHUNK = 8 << 20


def make_input(workdir: Path, classes: int, per_class: int, size: int) -> Path:
    """TinyImageNet-layout input with nothing to re-encode; reused when the parameters match."""
    path = workdir / f"input-c{classes}-n{per_class}-s{size}"
    if not (path / "wnids.txt").exists():
        shutil.rmtree(path, ignore_errors=True)
        synth.generate(str(path), classes=classes, train_per_class=per_class, val_per_class=max(1, per_class // 10),
                       test_count=0, size=size, grayscale_fraction=0.0)
    return path


def input_stats(path: Path) -> tuple[int, int]:
    """(images, bytes) of the train and val images."""
    count = total = 0
    for split in ("train", "val"):
        for dirpath, _, files in os.walk(path / split):
            for name in files:
                if name.endswith(".JPEG"):
                    count += 1
                    total += os.path.getsize(os.path.join(dirpath, name))
    return count, total


def tar_to(source: Path, url: str) -> float:
    """Seconds for `tar cf -` of train/ and val/ written to `url` through fsspec."""
    started = time.perf_counter()
    with subprocess.Popen(["tar", "cf", "-", "-C", str(source), "train", "val"], stdout=subprocess.PIPE) as tar, \
            fsspec.open(url, "wb") as out:
        while chunk := tar.stdout.read(CHUNK):
            out.write(chunk)
    if tar.returncode:
        raise RuntimeError(f"tar exited {tar.returncode}")
    return time.perf_counter() - started


def ingest_to(source: Path, url: str, processes: int) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ingest.shard", "--input", str(source), "--output", url,
                    "--processes", str(processes), "--log-level", "WARNING"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _clean_run(contender, source: Path, url: str, *args) -> float:
    """One timed run from the same state: dirty pages flushed first, its output removed after."""
    os.sync()
    seconds = contender(source, url, *args)
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=True)
    return seconds


def measure(target: str, source: Path, base_url: str, processes: int, images: int, nbytes: int,
            repeat: int) -> dict:
    """Median seconds of `repeat` alternating runs of each contender (the page cache makes
    single runs of either vary by up to 2x here)."""
    tar_runs, ingest_runs = [], []
    for _ in range(repeat):
        tar_runs.append(_clean_run(tar_to, source, f"{base_url}/plain-{uuid.uuid4().hex[:6]}.tar"))
        ingest_runs.append(_clean_run(ingest_to, source, f"{base_url}/shards-{uuid.uuid4().hex[:6]}", processes))
    tar_seconds, ingest_seconds = statistics.median(tar_runs), statistics.median(ingest_runs)
    result = {
        "target": target,
        "images": images,
        "input_mb": round(nbytes / 1e6, 1),
        "ingest_images_per_s": round(images / ingest_seconds),
        "ingest_mb_per_s": round(nbytes / 1e6 / ingest_seconds, 1),
        "tar_images_per_s": round(images / tar_seconds),
        "tar_mb_per_s": round(nbytes / 1e6 / tar_seconds, 1),
        "ratio_to_io_limit": round(tar_seconds / ingest_seconds, 2),
        "runs": repeat,
    }
    print(f"{target:5s}: ingest {result['ingest_images_per_s']} img/s ({result['ingest_mb_per_s']} MB/s), "
          f"tar {result['tar_images_per_s']} img/s ({result['tar_mb_per_s']} MB/s), "
          f"ratio {result['ratio_to_io_limit']}x the I/O limit (medians of {repeat} runs)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=200, help="classes in the synthetic input (default 200)")
    parser.add_argument("--train-per-class", type=int, default=250, help="train images per class (default 250)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, TinyImageNet)")
    parser.add_argument("--processes", type=int, default=2, help="ingest processes (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; medians are reported")
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3 (moto_server on 127.0.0.1)")
    parser.add_argument("--workdir", default="bench-data", help="scratch folder; the input is cached there")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    source = make_input(workdir, args.classes, args.train_per_class, args.size)
    images, nbytes = input_stats(source)
    tar_to(source, "memory://warm.tar")  # both contenders then read from the page cache
    print(f"input: {images} images, {nbytes / 1e6:.1f} MB, {args.size}px; {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    results = []
    with ExitStack() as stack:
        for target in args.targets.split(","):
            if target == "local":
                out = workdir / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                results.append(measure("local", source, str(out), args.processes, images, nbytes, args.repeat))
            elif target == "s3":
                results.append(measure("s3", source, _s3(stack), args.processes, images, nbytes, args.repeat))
            else:
                parser.error(f"unknown target {target!r}; use local and/or s3")
    if args.json:
        print(json.dumps(results))
    return 0


def _s3(stack: ExitStack) -> str:
    """A moto_server bucket, with the environment set so that child processes reach it too."""
    import boto3

    endpoint = stack.enter_context(moto_server())
    os.environ.update({**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint})
    boto3.client("s3").create_bucket(Bucket="bench")
    return "s3://bench"


if __name__ == "__main__":
    sys.exit(main())

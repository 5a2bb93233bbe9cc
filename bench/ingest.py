"""Ingest throughput against the I/O limit measured in the same run.

The I/O limit is plain `tar` of the same input files to the same destination (for S3: tar's
output streamed into one object through the same fsspec client); with the input in a bucket
(`--input-url s3://BUCKET/PREFIX`, on the local moto_server, the generated input uploaded there
first) it is a plain copy of the same input objects to the output store, each streamed through
the same fsspec client, `--processes` objects at a time. Ingest runs as a user runs it
(`python -m ingest.shard`, start-up and listing included) on input that needs no re-encoding.

    python -m bench.ingest [--layout tinyimagenet|imagenet] [--classes 200 --train-per-class 250 --size 64]
                           [--input-url s3://raw/input] [--targets local,s3] [--processes 2] [--json]
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import fsspec

from ingest import synth

from .servers import s3_bucket, upload

CHUNK = 8 << 20


def make_input(workdir: Path, layout: str, classes: int, per_class: int, size: int) -> tuple[Path, int]:
    """Synthetic input with nothing to re-encode, and its image count; reused when the parameters match."""
    path = workdir / f"input-{layout}-c{classes}-n{per_class}-s{size}"
    counted = path / ".images"   # hidden: no layout lists it
    if not counted.exists():
        shutil.rmtree(path, ignore_errors=True)
        truth = synth.generate(str(path), layout=layout, classes=classes, train_per_class=per_class,
                               val_per_class=max(1, per_class // 10), test_count=0, size=size,
                               grayscale_fraction=0.0)
        counted.write_text(str(sum(len(truth.splits[split]) for split in ("train", "val"))))
    return path, int(counted.read_text())


def input_bytes(url: str) -> int:
    fs, root = fsspec.core.url_to_fs(url)
    return sum(size for name, size in fs.du(root, total=False).items() if "/." not in name[len(root):])


def tar_to(source: str, url: str, processes: int) -> float:
    """Seconds for `tar cf -` of the input folder's contents written to `url` through fsspec."""
    names = sorted(n for n in os.listdir(source) if not n.startswith("."))
    started = time.perf_counter()
    with subprocess.Popen(["tar", "cf", "-", "-C", source, *names], stdout=subprocess.PIPE) as tar, \
            fsspec.open(f"{url}.tar", "wb") as out:
        while chunk := tar.stdout.read(CHUNK):
            out.write(chunk)
    if tar.returncode:
        raise RuntimeError(f"tar exited {tar.returncode}")
    return time.perf_counter() - started


def copy_to(source: str, url: str, processes: int) -> float:
    """Seconds to copy every input object to `url`, each streamed through fsspec, `processes` at a time."""
    in_fs, in_root = fsspec.core.url_to_fs(source)
    out_fs, out_root = fsspec.core.url_to_fs(url)
    names = [path for path in in_fs.find(in_root) if "/." not in path[len(in_root):]]

    def copy(path: str) -> None:
        with in_fs.open(path, "rb", block_size=CHUNK) as src, \
                out_fs.open(f"{out_root}/{path[len(in_root):].lstrip('/')}", "wb", block_size=CHUNK) as dst:
            shutil.copyfileobj(src, dst, CHUNK)

    started = time.perf_counter()
    with ThreadPoolExecutor(processes) as pool:
        list(pool.map(copy, names))
    return time.perf_counter() - started


def ingest_to(source: str, url: str, processes: int) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ingest.shard", "--input", source, "--output", url,
                    "--processes", str(processes), "--log-level", "WARNING"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _clean_run(contender, source: str, url: str, processes: int) -> float:
    """One timed run from the same state: dirty pages flushed first, its output removed after."""
    os.sync()
    seconds = contender(source, url, processes)
    fs, path = fsspec.core.url_to_fs(url)
    for leftover in (path, f"{path}.tar"):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)
    return seconds


def measure(target: str, source: str, base_url: str, processes: int, images: int, nbytes: int,
            repeat: int) -> dict:
    """Median seconds of `repeat` alternating runs of each contender (the page cache makes
    single runs of either vary by up to 2x here)."""
    baseline = tar_to if "://" not in source else copy_to
    name = baseline.__name__.removesuffix("_to")
    base_runs, ingest_runs = [], []
    for _ in range(repeat):
        base_runs.append(_clean_run(baseline, source, f"{base_url}/plain-{uuid.uuid4().hex[:6]}", processes))
        ingest_runs.append(_clean_run(ingest_to, source, f"{base_url}/shards-{uuid.uuid4().hex[:6]}", processes))
    base_seconds, ingest_seconds = statistics.median(base_runs), statistics.median(ingest_runs)
    result = {
        "input": source if "://" in source else "local",
        "target": target,
        "images": images,
        "input_mb": round(nbytes / 1e6, 1),
        "ingest_images_per_s": round(images / ingest_seconds),
        "ingest_mb_per_s": round(nbytes / 1e6 / ingest_seconds, 1),
        "baseline": name,
        "baseline_images_per_s": round(images / base_seconds),
        "baseline_mb_per_s": round(nbytes / 1e6 / base_seconds, 1),
        "ratio_to_io_limit": round(base_seconds / ingest_seconds, 2),
        "runs": repeat,
    }
    print(f"{result['input']} -> {target}: ingest {result['ingest_images_per_s']} img/s "
          f"({result['ingest_mb_per_s']} MB/s), {name} {result['baseline_images_per_s']} img/s "
          f"({result['baseline_mb_per_s']} MB/s), ratio {result['ratio_to_io_limit']}x the I/O limit "
          f"(medians of {repeat} runs)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="tinyimagenet", choices=("tinyimagenet", "imagenet"),
                        help="input layout: TinyImageNet folders, or the ILSVRC2012 archives (default tinyimagenet)")
    parser.add_argument("--classes", type=int, default=200, help="classes in the synthetic input (default 200)")
    parser.add_argument("--train-per-class", type=int, default=250, help="train images per class (default 250)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, TinyImageNet)")
    parser.add_argument("--input-url", metavar="s3://BUCKET/PREFIX",
                        help="read the input from this S3 location on the local moto_server (the generated input "
                             "is uploaded there first); the baseline is then a copy of the same objects")
    parser.add_argument("--processes", type=int, default=2, help="ingest processes, copy threads (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; medians are reported")
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3 (moto_server on 127.0.0.1)")
    parser.add_argument("--workdir", default="bench-data", help="scratch folder; the input is cached there")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.input_url and not args.input_url.startswith("s3://"):
        parser.error(f"--input-url {args.input_url}: only s3:// URLs (on the local moto_server) are benchmarked")

    workdir = Path(args.workdir).resolve()
    path, images = make_input(workdir, args.layout, args.classes, args.train_per_class, args.size)
    source = str(path)
    tar_to(source, "memory://warm", 1)  # every contender then reads from the page cache
    results = []
    with ExitStack() as stack:
        if args.input_url:
            source = upload(stack, path, args.input_url)
        nbytes = input_bytes(source)
        print(f"input: {args.layout}, {images} images, {nbytes / 1e6:.1f} MB, {args.size}px, at {source}; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}")
        for target in args.targets.split(","):
            if target == "local":
                out = workdir / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                results.append(measure("local", source, str(out), args.processes, images, nbytes, args.repeat))
            elif target == "s3":
                results.append(measure("s3", source, s3_bucket(stack), args.processes, images, nbytes, args.repeat))
            else:
                parser.error(f"unknown target {target!r}; use local and/or s3")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

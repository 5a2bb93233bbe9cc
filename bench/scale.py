"""Ingest at ImageNet scale, as far as one machine allows: an ILSVRC2012 download of 1.28 M small
images (1000 classes x 1,281 at 16 px by default; ~4 minutes to generate, cached in --workdir),
sharded by `python -m ingest.shard` as a user runs it, then finalized again on its own.

Reports wall time of the job and of its listing and planning (from the job's log), the peak
resident memory of the job's largest process and of a finalize, and the sizes of plan.json and
manifest.json. With `--input-url s3://BUCKET/PREFIX` the download is first uploaded to that
location on a local moto_server and read from there, and the requests on the input are counted
(through bench.faultproxy).

    python -m bench.scale [--classes 1000 --train-per-class 1281 --size 16] [--input-url s3://raw/ilsvrc] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import fsspec

from ingest import synth

from .faultproxy import fault_proxy
from .servers import s3_bucket, upload

# Runs the command given as its arguments and prints the peak resident set size (KiB) of its
# largest process (the command or one of its children) as its last line.
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def make_input(workdir: Path, classes: int, per_class: int, val_per_class: int, size: int) -> Path:
    path = workdir / f"ilsvrc-c{classes}-n{per_class}-v{val_per_class}-s{size}"
    done = path / ".complete"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        synth.generate(str(path), layout="imagenet", classes=classes, train_per_class=per_class,
                       val_per_class=val_per_class, size=size, grayscale_fraction=0.0)
        done.touch()
    return path


def measured(command: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MB of the largest process, stderr) of a command that must succeed."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
    *log, peak = result.stderr.rstrip().splitlines()
    return seconds, round(int(peak) / 1024), "\n".join(log)


def input_requests(proxy, bucket: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for method, target, _ in proxy.log:
        if target.startswith(f"/{bucket}/") or target.startswith(f"/{bucket}?"):
            counts["LIST" if "list-type" in target else method] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--train-per-class", type=int, default=1281, help="train images per class (default 1281)")
    parser.add_argument("--val-per-class", type=int, default=50, help="val images per class (default 50)")
    parser.add_argument("--size", type=int, default=16, help="typical image side in pixels (default 16)")
    parser.add_argument("--processes", type=int, default=2, help="ingest processes (default 2)")
    parser.add_argument("--input-url", metavar="s3://BUCKET/PREFIX",
                        help="read the download from there on a local moto_server, counting requests")
    parser.add_argument("--workdir", default="bench-data", help="scratch folder; the input is cached there")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    started = time.perf_counter()
    path = make_input(workdir, args.classes, args.train_per_class, args.val_per_class, args.size)
    print(f"input: {path} ({time.perf_counter() - started:.0f} s to make or find); {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    with ExitStack() as stack:
        source, output, env, proxy = str(path), str(workdir / "scale-out"), {}, None
        if args.input_url:
            source = upload(stack, path, args.input_url)
            output = f"{s3_bucket(stack, 'bench-out')}/scale"
            proxy = stack.enter_context(fault_proxy(os.environ["AWS_ENDPOINT_URL"]))
            env = {"AWS_ENDPOINT_URL": proxy.url}
        fs, root = fsspec.core.url_to_fs(output)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        job = [sys.executable, "-m", "ingest.shard", "--input", source, "--output", output,
               "--processes", str(args.processes)]
        job_seconds, job_rss, log = measured(job, env)
        planned = re.search(r"listed and planned in ([\d.]+) s", log)
        finalize_seconds, finalize_rss, _ = measured([sys.executable, "-m", "ingest.shard", "--output", output,
                                                      "--finalize"], env)
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        result = {
            "input": source if args.input_url else "local",
            "images": sum(info["samples"] for info in manifest["splits"].values()),
            "shards": sum(len(info["shards"]) for info in manifest["splits"].values()),
            "job_seconds": round(job_seconds, 1),
            "listing_and_planning_seconds": float(planned.group(1)) if planned else None,
            "job_peak_rss_mb": job_rss,
            "finalize_seconds": round(finalize_seconds, 1),
            "finalize_peak_rss_mb": finalize_rss,
            "plan_json_kb": round(fs.size(f"{root}/_index/plan.json") / 1e3),
            "manifest_json_kb": round(fs.size(f"{root}/manifest.json") / 1e3),
        }
        if proxy is not None:
            result["input_requests"] = input_requests(proxy, args.input_url.removeprefix("s3://").split("/", 1)[0])
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

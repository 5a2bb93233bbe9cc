"""`python -m ingest.shard`: a downloaded dataset -> WebDataset shards + manifest at any fsspec URL.

    plan (list input, deterministic shard plan) -> skip committed shards -> build and commit
    the rest in parallel -> finalize (manifest.json, written last)
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from tqdm import tqdm

from . import cli
from .config import IngestConfig, parse_bytes
from .errors import EXIT_CODES, IngestError, OutputError, Terminated
from .manifest import ShardsNotCommitted, finalize
from .metrics import IngestMetrics
from .plan import Plan, ShardPlan, make_plan
from .sources import CHOICES, scan_input, serial_starmap
from .storage import Location, display, parse_storage_options, prepare_output, resolve_input, write_json
from .writer import PLAN_FILE, ImageSettings, ShardWorker, load_committed, read_plan

log = logging.getLogger("ingest")


@dataclass
class RunReport:
    """What this invocation did, for the summary."""

    written: list[dict] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    manifest: dict | None = None
    where: str = ""
    pending: str = ""       # what --finalize-if-last left to the last worker


def run(config: IngestConfig) -> RunReport:
    started = time.perf_counter()
    # First: a --metrics-port that cannot be served is refused before the output is touched.
    metrics = IngestMetrics(config.metrics_port, config.worker_index, config.num_workers)
    output = Location(config.output, config.storage_options)
    fs, root = prepare_output(output)
    report = RunReport(where=display(fs, root))
    if config.input is not None:
        _run_worker(config, output, fs, root, report, metrics)
    if config.pushgateway:
        try:
            metrics.push(config.pushgateway)
        except OSError as exc:  # the dataset is complete; losing its metrics must not fail the job
            log.warning("could not push metrics to %s: %s", config.pushgateway, exc)
    if config.finalize or (config.input is not None and config.num_workers == 1):
        report.manifest = finalize(fs, root)
    elif config.finalize_if_last:
        # Each worker checks after its own last commit, so the last one to finish sees every shard.
        try:
            report.manifest = finalize(fs, root)
        except ShardsNotCommitted as exc:
            report.pending = f"{len(exc.missing)} shard(s) not committed"
    report.seconds = time.perf_counter() - started
    return report


def _run_worker(config: IngestConfig, output: Location, fs, root: str, report: RunReport,
                metrics: IngestMetrics) -> None:
    source = resolve_input(config.input, config.storage_options)
    image_settings = ImageSettings(config.resize, config.validate, config.quality)
    with ShardRunner(config.processes, (source, output, image_settings)) as runner:
        _plan_and_build(config, source, fs, root, runner, report, metrics)


def _plan_and_build(config: IngestConfig, source: Location, fs, root: str, runner: ShardRunner,
                    report: RunReport, metrics: IngestMetrics) -> None:
    log.info("listing %s", config.input)
    started = time.perf_counter()
    scan = scan_input(source, config.source, config.splits, runner.starmap)
    settings = {"kind": scan.kind, **config.settings()}
    plan = make_plan(scan, seed=config.seed, shard_size=config.shard_size,
                     shard_bytes=config.shard_bytes, run_bytes=config.tar_run_bytes, settings=settings)
    _claim_output(fs, root, plan, {**settings, "input": config.input})
    if config.worker_index == 0:
        metrics.record_listing(plan.problems)
    mine = plan.for_worker(config.num_workers, config.worker_index)
    committed = load_committed(fs, root, plan.plan_id)
    todo = [shard for shard in mine if shard.name not in committed]
    metrics.record_plan(mine, [committed[shard.name] for shard in mine if shard.name in committed])
    report.skipped = len(mine) - len(todo)
    log.info("%s: %d classes, %d shards planned, %d for this worker, %d already committed "
             "(listed and planned in %.1f s)", scan.kind, len(plan.classes), len(plan.shards), len(mine),
             report.skipped, time.perf_counter() - started)
    report.written = _build_all(todo, runner, plan.plan_id, metrics)


def _claim_output(fs, root: str, plan: Plan, source: dict) -> None:
    """Record the plan, or refuse an output that already holds a differently planned dataset."""
    existing = read_plan(fs, root)
    if existing is None:
        write_json(fs, f"{root}/{PLAN_FILE}", {**plan.describe(), "source": source})
    elif existing["plan_id"] != plan.plan_id:
        before = existing.get("source", {})
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in source.items() if before.get(k) != v]
        raise OutputError(
            f"{display(fs, root)} already holds a dataset planned differently "
            f"({'; '.join(changed) or 'the input files changed'}); use a new output location or delete that one")


def _build_all(todo: list, runner: ShardRunner, plan_id: str, metrics: IngestMetrics) -> list[dict]:
    total = sum(len(shard.samples) for shard in todo)
    written = []
    with tqdm(total=total, unit="img", desc="shards", dynamic_ncols=True,
              mininterval=1 if sys.stderr.isatty() else 30) as bar:
        for entry in runner.results(todo, plan_id):
            written.append(entry)
            metrics.record_shard(entry)
            bar.update(entry["samples"] + len(entry["rejected"]))
            bar.set_postfix(shards=f"{len(written)}/{len(todo)}", refresh=False)
    return written


class ShardRunner:
    """Builds and commits shards in this process, or in a pool of processes started at once
    so that their start-up (imports, opening storage) overlaps the listing of the input.

    A ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (killed for memory),
    the executor fails with BrokenProcessPool instead of waiting forever for its result."""

    def __init__(self, processes: int, worker_args: tuple):
        self._pool = None
        self._worker = None
        self._processes = processes
        if processes > 1:
            context = multiprocessing.get_context("spawn")  # no fork: storage clients hold threads
            self._pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_init_process,
                                             initargs=worker_args)
        else:
            self._worker = ShardWorker(*worker_args)

    def starmap(self, fn, args: list[tuple]) -> list:
        """[fn(*a) for a in args], in the pool when there is one (used for listing the input)."""
        if self._pool is None or not args:
            return serial_starmap(fn, args)
        size = max(1, len(args) // (8 * self._processes))
        # submit, not map: map cancels its futures when interrupted, and the executor then fails
        # setting BrokenProcessPool on them once SIGTERM stopped the workers (CPython 3.11).
        chunks = self._guard(self._submitted(_run_chunk, [(fn, args[i:i + size]) for i in range(0, len(args), size)]))
        return [result for chunk in chunks for result in chunk]

    def results(self, todo: list, plan_id: str) -> Iterator[dict]:
        """Index entries of the committed shards, in completion order."""
        if self._pool is None:
            return (self._worker(shard, plan_id) for shard in todo)
        return self._guard(self._submitted(_process_shard, [(shard, plan_id) for shard in todo], as_completed))

    def _submitted(self, fn, args: list[tuple], order=list) -> Iterator:
        """fn(*a) for each of args in the pool, results in `order` of the futures. A generator, so
        that a pool broken while tasks are still being submitted fails inside `_guard` too."""
        futures = [self._pool.submit(fn, *a) for a in args]
        for future in order(futures):
            yield future.result()

    @staticmethod
    def _guard(results: Iterator) -> Iterator:
        try:
            yield from results
        except BrokenProcessPool:
            raise IngestError("a worker process died (killed for memory?); committed shards are kept, "
                              "rerun to resume (with fewer --processes if memory is short)") from None

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is None:
            return
        if exc_type is not None and issubclass(exc_type, Terminated):
            # Stopping now: a shard in flight is never half committed, and a rerun redoes it.
            self._pool.shutdown(wait=False)
            for child in multiprocessing.active_children():
                child.terminate()
            return
        # Shards in progress finish and commit; queued ones are dropped.
        self._pool.shutdown(wait=True, cancel_futures=True)


_WORKER: ShardWorker | None = None


def _init_process(*worker_args) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = ShardWorker(*worker_args)


def _run_chunk(fn, args: list[tuple]) -> list:
    return [fn(*a) for a in args]


def _process_shard(shard: ShardPlan, plan_id: str) -> dict:
    return _WORKER(shard, plan_id)


def summary(report: RunReport) -> str:
    written_samples = sum(e["samples"] + len(e["rejected"]) for e in report.written)
    rate = written_samples / report.seconds if report.seconds else 0.0
    lines = [f"dataset {report.where}"]
    if report.manifest is not None:
        lines += _dataset_lines(report.manifest)
    elif report.pending:
        lines.append(f"  (not finalized yet: {report.pending}, other workers are still writing; "
                     "the last worker to finish writes manifest.json)")
    else:
        lines.append("  (not finalized: run with --finalize once every worker is done)")
    lines.append(f"this run: {len(report.written)} shards written ({written_samples} images, {rate:.0f} images/s), "
                 f"{report.skipped} already committed, wall time {report.seconds:.1f} s")
    return "\n".join(lines)


def _dataset_lines(manifest: dict) -> list[str]:
    lines = [f"  {len(manifest['classes'])} classes ({manifest['source']['kind']})"]
    for split, info in manifest["splits"].items():
        size = sum(s["bytes"] for s in info["shards"])
        lines.append(f"  {split}: {info['samples']} samples in {len(info['shards'])} shards, {size / 1e6:.1f} MB")
    lines.append(f"  re-encoded: {_counts(manifest['reencoded'])}")
    lines.append(f"  rejected: {_counts(manifest['rejected_by_reason'])}"
                 + (" (listed in manifest.json)" if manifest["rejected"] else ""))
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "none"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.shard",
        description="Convert a downloaded ImageNet / TinyImageNet / ImageFolder dataset into WebDataset "
                    "tar shards plus manifest.json at any fsspec URL. Rerunning resumes.",
        epilog="exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()),
    )
    add = parser.add_argument
    add("--input", help="dataset as downloaded: tiny-imagenet-200.zip or folder, the folder of the ILSVRC2012 "
                        "tars + devkit, the Kaggle ILSVRC folder, or an ImageFolder tree")
    add("--output", required=True, help="where the shards go: a path or fsspec URL (file://, s3://, gs://, memory://)")
    add("--source", default="auto", choices=CHOICES,
        help="input layout; 'auto' detects it, 'imagenet' accepts the official tars and the Kaggle layout")
    add("--splits", default="train,val", type=lambda s: tuple(p.strip() for p in s.split(",")),
        help="comma-separated splits to convert (default train,val; 'test' is unlabelled)")
    add("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    add("--shard-bytes", type=_bytes_arg, default=None,
        help="also cut a shard before it exceeds this many bytes, e.g. 500M (estimated from source sizes)")
    add("--tar-run-bytes", type=_bytes_arg, default="4M", metavar="SIZE",
        help="images stored next to each other in an input tar (the ILSVRC2012 archives) go to a shard in runs "
             "of up to SIZE (default 4M) or 1/32 of a shard, whichever is smaller, each read with one request: few "
             "large requests from object storage, each shard still mixing at least 32 places of the tar; 0: every "
             "image on its own")
    add("--processes", type=int, default=os.cpu_count() or 1,
        help="parallel processes on this machine (default: CPU count)")
    add("--num-workers", type=int, default=1, help="number of machines/pods splitting the plan (default 1)")
    add("--worker-index", type=int, default=os.environ.get("JOB_COMPLETION_INDEX", "0"),
        help="this worker's index, 0..num-workers-1 (default: $JOB_COMPLETION_INDEX, set in a Kubernetes "
             "Indexed Job, else 0)")
    add("--finalize", action="store_true",
        help="write manifest.json from the committed shards (alone: no --input needed); implied with one worker")
    add("--finalize-if-last", action="store_true",
        help="for N workers started at once (a Kubernetes Indexed Job): after its own shards, a worker that finds "
             "every planned shard committed writes manifest.json; the others exit 0 and leave it to the last one")
    add("--resize", type=int, default=None, metavar="SHORTER_SIDE",
        help="downscale images whose shorter side exceeds this (re-encodes them)")
    add("--validate", default="header", choices=("header", "full"),
        help="'header': cheap structural checks (default); 'full': also decode every image")
    add("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    add("--seed", type=int, default=0, help="seed of the shuffle that mixes classes across shards (default 0)")
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec storage option for input and output, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)")
    add("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    add("--pushgateway", metavar="URL", help="push the final counts to this Prometheus Pushgateway at the end")
    add("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
        help="with --metrics-port: once the work is done, serve the final metrics this long (2-3 scrape intervals) "
             "so that Prometheus sees the last shards; SIGTERM ends it with success (default 0)")
    add("--log-level", default="INFO", choices=cli.LOG_LEVELS, help="logging level (default INFO)")
    return parser


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:   # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    return IngestConfig(
        output=args.output, input=args.input, source=args.source, splits=args.splits,
        shard_size=args.shard_size, shard_bytes=args.shard_bytes, tar_run_bytes=args.tar_run_bytes, processes=args.processes,
        num_workers=args.num_workers, worker_index=args.worker_index, finalize=args.finalize,
        finalize_if_last=args.finalize_if_last,
        resize=args.resize, validate=args.validate, quality=args.quality, seed=args.seed,
        storage_options=parse_storage_options(args.storage_option),
        metrics_port=args.metrics_port, pushgateway=args.pushgateway, metrics_linger=args.metrics_linger,
    )


def main(argv: list[str] | None = None) -> int:
    args, config = cli.parse(build_parser(), argv, config_from_args)
    return cli.run_main(lambda: _shard(config), args.log_level)


def _shard(config: IngestConfig) -> None:
    report = run(config)
    # The work is done: a stop from now on (SIGTERM, which run_main raises as Terminated, or Ctrl-C)
    # is a success, not a failure the Job would retry.
    try:
        print(summary(report), flush=True)
        if config.metrics_linger:
            # A pod that ends takes its /metrics with it: without this, the shards committed since
            # Prometheus's last scrape are never seen and the dashboard stops short of 100%.
            log.info("serving the final metrics for %g s (--metrics-linger)", config.metrics_linger)
            time.sleep(config.metrics_linger)
    except KeyboardInterrupt:
        log.info("stopped: the work is done")


if __name__ == "__main__":
    sys.exit(main())

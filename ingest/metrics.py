"""Prometheus metrics of an ingest worker (names in docs/metrics.md). Served on /metrics while the
job runs (`--metrics-port`) and, as Prometheus recommends for batch jobs, pushed once at the end
to a Pushgateway (`--pushgateway URL`).

Every series carries `worker` (the worker index): a rerun or a replaced pod starts its counters at
what the worker's committed shards already hold, so a worker's counters never go back and a
dashboard's `max by (worker)` of them over time is the dataset's progress, pods ended or not."""
from __future__ import annotations

import time
from importlib.metadata import version

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, Summary, push_to_gateway, start_http_server

from .errors import UsageError
from .images import REENCODE_CAUSES, REJECT_REASONS


class IngestMetrics:
    def __init__(self, port: int | None = None, worker: int = 0, workers: int = 1):
        self.registry = CollectorRegistry()
        self.worker = str(worker)
        metric = {"registry": self.registry}
        self.images = Counter("ingest_images", "Images stored in committed shards", ["worker", "split"], **metric)
        self.bytes = Counter("ingest_written_bytes", "Shard bytes written", ["worker"], **metric)
        self.shards = Counter("ingest_shards_committed", "Shards committed", ["worker"], **metric)
        # This run's commits only (the counters above start at an earlier run's): the mean over a window,
        # rate(_sum) / rate(_count), is of two series of the same age, right however young the worker.
        self.shard_seconds = Summary("ingest_shard_seconds", "Wall time per shard this run committed: since the "
                                     "previous commit (or the start of building)", ["worker"], **metric)
        self.rejected = Counter("ingest_images_rejected", "Images rejected, by reason", ["worker", "reason"],
                                **metric)
        self.reencoded = Counter("ingest_images_reencoded", "Images re-encoded to RGB JPEG, by cause",
                                 ["worker", "cause"], **metric)
        self.shards_planned = Gauge("ingest_shards_planned", "Shards of this worker's share of the plan",
                                    ["worker"], **metric)
        self.images_planned = Gauge("ingest_images_planned", "Images listed in this worker's share of the plan",
                                    ["worker"], **metric)
        Info("ingest", "The worker: index, worker count, version", **metric).info(
            {"worker": self.worker, "workers": str(workers), "version": version("imagenet-k8s-trainer")})
        # Known label values start at 0, so dashboards and rate() see the series before the first event.
        for reason in REJECT_REASONS:
            self.rejected.labels(self.worker, reason)
        for cause in REENCODE_CAUSES:
            self.reencoded.labels(self.worker, cause)
        self.bytes.labels(self.worker)
        self.shards.labels(self.worker)
        self.shard_seconds.labels(self.worker)
        if port is not None:
            try:
                start_http_server(port, registry=self.registry)
            except OSError as exc:   # taken, or privileged: the flag's fault, one line (as the trainer's)
                raise UsageError(f"--metrics-port: cannot serve metrics on port {port}: {exc.strerror or exc}") from None

    def record_plan(self, mine: list, committed: list[dict]) -> None:
        """This worker's share (ShardPlans), and the entries of those already committed by an earlier
        run of it, counted as if this run had written them."""
        self.shards_planned.labels(self.worker).set(len(mine))
        self.images_planned.labels(self.worker).set(sum(len(shard.samples) for shard in mine))
        for entry in committed:
            self._count(entry)
        self._since = time.monotonic()   # building starts

    def record_shard(self, entry: dict) -> None:
        """Count one shard this run committed, and the wall time since the previous commit."""
        now = time.monotonic()
        self.shard_seconds.labels(self.worker).observe(now - self._since)
        self._since = now
        self._count(entry)

    def _count(self, entry: dict) -> None:
        """Count one committed shard from its index entry."""
        self.images.labels(self.worker, entry["split"]).inc(entry["samples"])
        self.bytes.labels(self.worker).inc(entry["bytes"])
        self.shards.labels(self.worker).inc()
        for rejected in entry["rejected"]:
            self.rejected.labels(self.worker, rejected["reason"]).inc()
        for cause, count in entry["reencoded"].items():
            self.reencoded.labels(self.worker, cause).inc(count)

    def record_listing(self, problems: list) -> None:
        """Count the samples refused while listing (missing, duplicate, unsafe, ...), which never
        reach a shard. One worker of N counts them, as the plan (and so the list) is the same in all."""
        for problem in problems:
            self.rejected.labels(self.worker, problem.reason).inc()

    def push(self, gateway: str, job: str = "ingest") -> None:
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key={"worker": self.worker})

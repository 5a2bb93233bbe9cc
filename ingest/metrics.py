"""Prometheus metrics of an ingest run (names in shared/DESIGN.md). Served on /metrics while the
job runs (`--metrics-port`) and, as Prometheus recommends for batch jobs, pushed once at the end
to a Pushgateway (`--pushgateway URL`)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, push_to_gateway, start_http_server

from .images import REENCODE_CAUSES, REJECT_REASONS


class IngestMetrics:
    def __init__(self, port: int | None = None):
        self.registry = CollectorRegistry()
        metric = {"registry": self.registry}
        self.images = Counter("ingest_images", "Images stored in committed shards", ["split"], **metric)
        self.bytes = Counter("ingest_bytes_written", "Shard bytes written", **metric)
        self.shards = Counter("ingest_shards_committed", "Shards committed", **metric)
        self.rejected = Counter("ingest_images_rejected", "Images rejected, by reason", ["reason"], **metric)
        self.reencoded = Counter("ingest_images_reencoded", "Images re-encoded to RGB JPEG, by cause", ["cause"],
                                 **metric)
        # Known label values start at 0, so dashboards and rate() see the series before the first event.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for cause in REENCODE_CAUSES:
            self.reencoded.labels(cause)
        if port is not None:
            start_http_server(port, registry=self.registry)

    def record_shard(self, entry: dict) -> None:
        """Count one committed shard from its index entry."""
        self.images.labels(entry["split"]).inc(entry["samples"])
        self.bytes.inc(entry["bytes"])
        self.shards.inc()
        for rejected in entry["rejected"]:
            self.rejected.labels(rejected["reason"]).inc()
        for cause, count in entry["reencoded"].items():
            self.reencoded.labels(cause).inc(count)

    def record_listing(self, problems: list) -> None:
        """Count the samples refused while listing (missing, duplicate, unsafe, ...), which never
        reach a shard. One worker of N counts them, as the plan (and so the list) is the same in all."""
        for problem in problems:
            self.rejected.labels(problem.reason).inc()

    def push(self, gateway: str, job: str = "ingest", grouping: dict[str, str] | None = None) -> None:
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key=grouping or {})

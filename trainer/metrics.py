"""Prometheus metrics of a training worker, served on /metrics (names in shared/DESIGN.md:
base units, `_total` counters, ratios 0..1; the only label besides split/k/reason is `rank`)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

from .errors import UsageError
from .shards import ReadStats

# From a fast GPU step (milliseconds) to a slow CPU one (seconds).
SKIP_REASONS = ("shard_missing", "shard_unreadable", "shard_corrupt", "sample_incomplete", "sample_undecodable")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TrainerMetrics:
    def __init__(self, rank: int, info: dict[str, str], port: int | None = None):
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        labels, self.rank = ["rank"], str(rank)
        metric = {"registry": self.registry, "labelnames": labels}
        self.images = Counter("trainer_images", "Training images processed", **metric)
        self.step = Histogram("trainer_step_seconds", "Wall time of one training step", buckets=STEP_BUCKETS,
                              **metric)
        self.data_wait = Histogram("trainer_data_wait_seconds", "Time a step waited for its batch",
                                   buckets=STEP_BUCKETS, **metric)
        self.loss = Gauge("trainer_loss", "Mean training loss of the last epoch", **metric)
        self.accuracy = Gauge("trainer_accuracy", "Top-k accuracy of the last epoch (ratio)",
                              registry=self.registry, labelnames=["rank", "split", "k"])
        self.epoch = Gauge("trainer_epoch", "Epochs completed", **metric)
        self.learning_rate = Gauge("trainer_learning_rate", "Current learning rate", **metric)
        self.shard_bytes = Counter("trainer_shard_bytes_read", "Shard bytes read from storage", **metric)
        self.skipped = Counter("trainer_samples_skipped", "Samples or shards skipped, by reason",
                               registry=self.registry, labelnames=["rank", "reason"])
        Info("trainer", "The run: model, workers, version", registry=self.registry).info(info)
        for reason in SKIP_REASONS:   # start at 0: dashboards and rate() see them before the first skip
            self.skipped.labels(self.rank, reason)
        # From start-up, before the first step: a run stalled in its first allreduce shows a rate of 0
        # (the TrainingStalled alert), not an absent series.
        self.images.labels(self.rank)
        self._read_bytes = 0
        self._skipped: dict[str, int] = {}
        if port is not None:
            self._serve(port)

    def _serve(self, port: int) -> None:
        if port > 65535:
            raise UsageError(f"--metrics-port: rank {self.rank} would serve on port {port} (the flag plus its local "
                             f"rank), above 65535")
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port: rank {self.rank} cannot serve metrics on port {port} "
                             f"(the flag plus its local rank): {exc.strerror or exc}") from None

    def record_step(self, images: int, step_seconds: float, wait_seconds: float) -> None:
        self.images.labels(self.rank).inc(images)
        self.step.labels(self.rank).observe(step_seconds)
        self.data_wait.labels(self.rank).observe(wait_seconds)

    def record_epoch(self, epoch: int, loss: float, accuracies: dict[tuple[str, int], float], lr: float) -> None:
        self.epoch.labels(self.rank).set(epoch + 1)
        self.loss.labels(self.rank).set(loss)
        for (split, k), value in accuracies.items():
            self.accuracy.labels(self.rank, split, str(k)).set(value)
        self.learning_rate.labels(self.rank).set(lr)

    def record_reads(self, stats: ReadStats) -> None:
        """Bring the counters up to the reader's running totals."""
        self.shard_bytes.labels(self.rank).inc(stats.shard_bytes - self._read_bytes)
        self._read_bytes = stats.shard_bytes
        reasons = {**{f"shard_{r}": n for r, n in stats.skipped_shards.items()},
                   **{f"sample_{r}": n for r, n in stats.skipped_samples.items()}}
        for reason, count in reasons.items():
            self.skipped.labels(self.rank, reason).inc(count - self._skipped.get(reason, 0))
            self._skipped[reason] = count

"""Prometheus metrics of a training worker, served on /metrics (names in docs/metrics.md: base units,
`_total` counters, `_ratio` for 0..1 gauges, `_bytes_total` for byte counters; every series carries
`rank`, the only label besides split/k/reason/phase)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

from .errors import UsageError
from .shards import ReadStats

SHARD_SKIPS = ("missing", "unreadable", "corrupt")
SAMPLE_SKIPS = ("incomplete", "undecodable")
# Where a step's wall time goes; the phases add up to trainer_step_seconds_sum.
PHASES = ("data", "compute", "allreduce", "other")
# 25% apart from 2 ms (a fast GPU step) to a minute: a steady step reads within a quarter of its time in
# any quantile (2.5x-wide buckets read a steady 0.12 s step as p50 0.175 s). Means come from the sums.
STEP_BUCKETS = tuple(round(0.002 * 1.25 ** i, 6) for i in range(47))


class TrainerMetrics:
    def __init__(self, rank: int, info: dict[str, str], port: int | None = None):
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.rank = str(rank)
        self._define()
        Info("trainer", "The run: rank, model, workers, version", registry=self.registry).info(
            {**info, "rank": self.rank})
        # Every series from start-up, before its first event: dashboards and rate() see 0, not nothing,
        # and a run stalled in its first allreduce shows an image rate of 0 (the TrainingStalled alert).
        for reason in SHARD_SKIPS:
            self.shards_skipped.labels(self.rank, reason)
        for reason in SAMPLE_SKIPS:
            self.samples_skipped.labels(self.rank, reason)
        for phase in PHASES:
            self.phase.labels(self.rank, phase)
        self.images.labels(self.rank)
        self.read_bytes.labels(self.rank)
        self.step_seconds.labels(self.rank)
        self._read_bytes = 0
        self._skipped: dict[tuple[str, str], int] = {}
        if port is not None:
            self._serve(port)

    def _define(self) -> None:
        metric = {"registry": self.registry, "labelnames": ["rank"]}
        self.images = Counter("trainer_images", "Training images processed", **metric)
        self.step_seconds = Histogram("trainer_step_seconds", "Wall time of one training step, data wait included",
                                      buckets=STEP_BUCKETS, **metric)
        self.phase = Counter("trainer_step_phase_seconds", "Step time by phase: waiting for data, computing the "
                             "gradients, in the gradient allreduce (waiting for the slowest rank included), other",
                             registry=self.registry, labelnames=["rank", "phase"])
        self.loss = Gauge("trainer_loss", "Mean training loss of the last epoch", **metric)
        self.accuracy = Gauge("trainer_accuracy_ratio", "Top-k accuracy of the last epoch",
                              registry=self.registry, labelnames=["rank", "split", "k"])
        self.epoch = Gauge("trainer_epoch", "Epochs completed", **metric)
        self.epochs_planned = Gauge("trainer_epochs_planned", "Epochs the run is configured for", **metric)
        self.epoch_steps = Gauge("trainer_epoch_steps_planned", "Steps of the epoch in progress", **metric)
        self.epoch_step = Gauge("trainer_epoch_steps_completed", "Steps of the epoch in progress done", **metric)
        self.workers = Gauge("trainer_workers", "Ranks the run was started with", **metric)
        self.learning_rate = Gauge("trainer_learning_rate", "Current learning rate", **metric)
        self.checkpoint_time = Gauge("trainer_last_checkpoint_timestamp_seconds",
                                     "Unix time of the run's last checkpoint (of this start when it has none): "
                                     "the work a failure now would lose is since then", **metric)
        self.read_bytes = Counter("trainer_shard_read_bytes", "Shard bytes read from storage", **metric)
        self.shards_skipped = Counter("trainer_shards_skipped", "Shards skipped, by reason",
                                      registry=self.registry, labelnames=["rank", "reason"])
        self.samples_skipped = Counter("trainer_samples_skipped", "Samples skipped, by reason",
                                       registry=self.registry, labelnames=["rank", "reason"])

    def _serve(self, port: int) -> None:
        if port > 65535:
            raise UsageError(f"--metrics-port: rank {self.rank} would serve on port {port} (the flag plus its local "
                             f"rank), above 65535")
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port: rank {self.rank} cannot serve metrics on port {port} "
                             f"(the flag plus its local rank): {exc.strerror or exc}") from None

    def record_plan(self, workers: int, epochs: int, epochs_done: int, checkpoint_time: float | None) -> None:
        """At start-up: the run's size and length, and how far it is (a resumed run's epochs)."""
        self.workers.labels(self.rank).set(workers)
        self.epochs_planned.labels(self.rank).set(epochs)
        self.epoch.labels(self.rank).set(epochs_done)
        self.record_checkpoint(checkpoint_time or time.time())

    def record_checkpoint(self, when: float | None = None) -> None:
        self.checkpoint_time.labels(self.rank).set(when or time.time())

    def start_epoch(self, steps: int, done: int) -> None:
        self.epoch_steps.labels(self.rank).set(steps)
        self.epoch_step.labels(self.rank).set(done)

    def record_step(self, images: int, seconds: float, phases: dict[str, float]) -> None:
        """One step: its wall time and where it went (`phases` without "other", the rest)."""
        self.images.labels(self.rank).inc(images)
        self.step_seconds.labels(self.rank).observe(seconds)
        for phase, spent in {**phases, "other": max(seconds - sum(phases.values()), 0.0)}.items():
            self.phase.labels(self.rank, phase).inc(max(spent, 0.0))
        self.epoch_step.labels(self.rank).inc()

    def record_epoch(self, epoch: int, loss: float, accuracies: dict[tuple[str, int], float], lr: float) -> None:
        self.epoch.labels(self.rank).set(epoch + 1)
        self.epoch_step.labels(self.rank).set(0)
        self.loss.labels(self.rank).set(loss)
        for (split, k), value in accuracies.items():
            self.accuracy.labels(self.rank, split, str(k)).set(value)
        self.learning_rate.labels(self.rank).set(lr)

    def record_reads(self, stats: ReadStats) -> None:
        """Bring the counters up to the reader's running totals."""
        read, shards, samples = stats.snapshot()
        self.read_bytes.labels(self.rank).inc(read - self._read_bytes)
        self._read_bytes = read
        for kind, counter, counts in (("shards", self.shards_skipped, shards),
                                      ("samples", self.samples_skipped, samples)):
            for reason, count in counts.items():
                counter.labels(self.rank, reason).inc(count - self._skipped.get((kind, reason), 0))
                self._skipped[kind, reason] = count

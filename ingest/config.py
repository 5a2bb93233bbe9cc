"""The ingest job's configuration: one typed dataclass, validated where it is built."""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .images import VALIDATION_MODES
from .sources import CHOICES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """`500M`, `1GiB`, `123456` -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"byte size {text!r} not understood; use e.g. 500M, 2G or a number of bytes")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value):
        raise ValueError(f"byte size {text!r} is not a whole number of bytes")
    return int(value)


@dataclass
class IngestConfig:
    output: str
    input: str | None = None
    source: str = "auto"
    splits: tuple[str, ...] = ("train", "val")
    shard_size: int = 1000
    shard_bytes: int | None = None
    tar_run_bytes: int = 4 << 20        # images next to each other in an input tar: read in runs of this size
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    num_workers: int = 1
    worker_index: int = 0
    finalize: bool = False
    finalize_if_last: bool = False      # a worker that finds every planned shard committed writes the manifest
    resize: int | None = None
    validate: str = "header"
    quality: int = 95
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    metrics_port: int | None = None     # serve Prometheus metrics while running
    pushgateway: str | None = None      # push the final counts there (batch-job pattern)
    metrics_linger: float = 0.0         # seconds to serve the final metrics once the work is done (the CLI's)

    def __post_init__(self) -> None:
        self.splits = tuple(self.splits)
        checks = [
            (self.input is not None or self.finalize, "--input is required (only --finalize runs without it)"),
            (self.source in CHOICES, f"source {self.source!r} unknown; choose one of {', '.join(CHOICES)}"),
            (bool(self.splits) and all(self.splits), f"splits {','.join(self.splits)!r} must name at least one split"),
            (len(set(self.splits)) == len(self.splits), f"splits {','.join(self.splits)!r} repeat a split"),
            (self.shard_size >= 1, f"shard size {self.shard_size} must be >= 1"),
            (self.shard_bytes is None or self.shard_bytes >= 1, f"shard bytes {self.shard_bytes} must be >= 1"),
            (self.tar_run_bytes >= 0, f"tar run bytes {self.tar_run_bytes} must be >= 0"),
            (self.processes >= 1, f"processes {self.processes} must be >= 1"),
            (self.num_workers >= 1, f"num workers {self.num_workers} must be >= 1"),
            (not self.finalize_if_last or self.input is not None, "--finalize-if-last needs --input (it is a worker's mode)"),
            (not (self.finalize and self.finalize_if_last), "--finalize and --finalize-if-last exclude each other"),
            (self.input is None or 0 <= self.worker_index < self.num_workers,
             f"worker index {self.worker_index} must be in 0..{self.num_workers - 1}"),
            (self.resize is None or self.resize >= 1, f"resize {self.resize} must be >= 1"),
            (self.validate in VALIDATION_MODES,
             f"validate {self.validate!r} unknown; choose one of {', '.join(VALIDATION_MODES)}"),
            (1 <= self.quality <= 100, f"quality {self.quality} must be in 1..100"),
            (self.metrics_port is None or 1 <= self.metrics_port <= 65535,
             f"metrics port {self.metrics_port} must be in 1..65535"),
            (0 <= self.metrics_linger < math.inf, f"metrics linger {self.metrics_linger} must be a number of seconds >= 0"),
            (not self.metrics_linger or self.metrics_port is not None,
             "--metrics-linger needs --metrics-port (it serves the final metrics there)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def settings(self) -> dict[str, Any]:
        """What defines the dataset's content (and so the plan id); no paths, no credentials."""
        keys = ("splits", "shard_size", "shard_bytes", "tar_run_bytes", "resize", "validate", "quality", "seed")
        values = asdict(self)
        return {k: list(values[k]) if k == "splits" else values[k] for k in keys}

"""The deterministic plan: which sample goes into which shard, decided before any write.

Per split: drop duplicate keys, sort by key, group into runs, shuffle the runs with a seed
derived from (seed, split) so that every shard mixes classes, cut by sample count and estimated
bytes, and shuffle each shard's own order. A run is one sample, except for images stored next to
each other inside an input tar (the ILSVRC2012 archives): those go to a shard in runs of up to
`run_bytes` bytes and a 1/RUNS_PER_SHARD share of a shard, so that each run is read with one
request from object storage instead of one request per image. Every worker and every rerun
computes the same plan from the same input, which is what makes resume and the multi-worker
split work without coordination.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .sources import ClassInfo, Problem, Sample, Scan

TAR_BLOCK = 512
# Per sample: three member headers plus the .cls and .json payloads (one block each).
SAMPLE_OVERHEAD_BYTES = 5 * TAR_BLOCK
TAR_END_BYTES = 2 * TAR_BLOCK
# A shard holds at least this many runs (so at least this many places of a tar, e.g. classes),
# however small its images.
RUNS_PER_SHARD = 32


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"


@dataclass(frozen=True)
class Plan:
    plan_id: str
    classes: list[ClassInfo]
    shards: list[ShardPlan]
    problems: list[Problem]
    labelled: dict[str, bool]

    def for_worker(self, num_workers: int, worker_index: int) -> list[ShardPlan]:
        """Round-robin over the global shard list: workers get equal shares of every split."""
        return self.shards[worker_index::num_workers]

    def describe(self) -> dict:
        """What finalize needs to build the manifest without access to the input."""
        splits: dict[str, list[str]] = {split: [] for split in self.labelled}
        for shard in self.shards:
            splits[shard.split].append(shard.name)
        return {
            "plan_id": self.plan_id,
            "classes": [{"index": c.index, "wnid": c.wnid, "name": c.name} for c in self.classes],
            "splits": {s: {"shards": names, "labelled": self.labelled[s]} for s, names in splits.items()},
            "problems": [problem_record(p) for p in self.problems],
        }


def problem_record(problem: Problem) -> dict:
    return {"split": problem.split, "source": problem.source, "reason": problem.reason, "detail": problem.detail}


def make_plan(scan: Scan, *, seed: int, shard_size: int, shard_bytes: int | None, run_bytes: int,
              settings: dict) -> Plan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    run_samples = max(1, shard_size // RUNS_PER_SHARD) if run_bytes else 1
    problems = list(scan.problems)
    shards: list[ShardPlan] = []
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for split, samples in scan.splits.items():
        unique = _drop_duplicates(split, sorted(samples, key=lambda s: (s.key, s.source)), problems)
        digest.update("".join(f"{split}\t{s.key}\t{s.label}\t{s.size}\t{s.source}\n" for s in unique).encode())
        runs = _runs(unique, run_bytes, run_samples)
        random.Random(f"{seed}:{split}").shuffle(runs)
        for number, group in enumerate(_cut([s for run in runs for s in run], shard_size, shard_bytes)):
            random.Random(f"{seed}:{split}:{number}").shuffle(group)
            shards.append(ShardPlan(split, number, tuple(group)))
    digest.update(repr([(c.wnid, c.name) for c in scan.classes]).encode())
    labelled = {split: any(s.label is not None for s in samples) for split, samples in scan.splits.items()}
    return Plan(digest.hexdigest()[:16], scan.classes, shards, problems, labelled)


def _drop_duplicates(split: str, ordered: list[Sample], problems: list[Problem]) -> list[Sample]:
    """From samples sorted by (key, source): keep the first of each key, count the others."""
    kept: list[Sample] = []
    for sample in ordered:
        if kept and kept[-1].key == sample.key:
            problems.append(Problem(split, sample.source, "duplicate_key",
                                    f"key {sample.key} already used by {kept[-1].source}"))
        else:
            kept.append(sample)
    return kept


def _runs(samples: list[Sample], run_bytes: int, run_samples: int) -> list[list[Sample]]:
    """Samples in key order, each its own run, except tar members: those in runs of neighbours
    (in file order) of at most `run_bytes` bytes and `run_samples` samples."""
    runs = [[s] for s in samples if s.start is None]
    current: list[Sample] = []
    size = 0
    for sample in sorted((s for s in samples if s.start is not None), key=lambda s: (s.path, s.start)):
        if current and (sample.path != current[-1].path or len(current) >= run_samples
                        or size + sample.size > run_bytes):
            runs.append(current)
            current, size = [], 0
        current.append(sample)
        size += sample.size
    if current:
        runs.append(current)
    return runs


def _cut(samples: list[Sample], shard_size: int, shard_bytes: int | None) -> list[list[Sample]]:
    """Consecutive groups of at most shard_size samples and (as far as source sizes tell) shard_bytes."""
    groups: list[list[Sample]] = []
    current: list[Sample] = []
    current_bytes = TAR_END_BYTES
    for sample in samples:
        cost = -(-sample.size // TAR_BLOCK) * TAR_BLOCK + SAMPLE_OVERHEAD_BYTES
        full = len(current) >= shard_size or (shard_bytes is not None and current_bytes + cost > shard_bytes)
        if current and full:
            groups.append(current)
            current, current_bytes = [], TAR_END_BYTES
        current.append(sample)
        current_bytes += cost
    if current:
        groups.append(current)
    return groups

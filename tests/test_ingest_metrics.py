"""An ingest worker's Prometheus metrics: its planned share, and counters that carry a worker's
committed work across reruns and replaced pods."""
from __future__ import annotations

import re
import urllib.request

from bench.servers import free_port
from ingest import synth
from ingest.config import IngestConfig
from ingest.shard import run

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def exposition_of(config: IngestConfig) -> dict[str, float]:
    run(config)
    text = urllib.request.urlopen(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=5).read().decode()
    return {m[1] + (m[2] or ""): float(m[3]) for m in map(SAMPLE.match, text.splitlines()) if m}


def test_a_rerun_worker_counts_what_its_share_already_holds(tmp_path):
    source = tmp_path / "tiny-imagenet-200"
    synth.generate(str(source), classes=4, train_per_class=10, val_per_class=4, size=32, seed=3)
    settings = {"output": str(tmp_path / "out"), "input": str(source), "shard_size": 4, "processes": 1,
                "num_workers": 2, "worker_index": 1}
    first = exposition_of(IngestConfig(**settings, metrics_port=free_port()))
    again = exposition_of(IngestConfig(**settings, metrics_port=free_port()))   # a replaced pod: all committed

    # 56 images, no rejects, in shards of 4: 14 shards, half of them this worker's
    assert first['ingest_shards_planned{worker="1"}'] == 7
    assert first['ingest_images_planned{worker="1"}'] == 28
    for name in ('ingest_shards_committed_total{worker="1"}', 'ingest_written_bytes_total{worker="1"}',
                 'ingest_images_total{split="train",worker="1"}', 'ingest_images_total{split="val",worker="1"}'):
        assert again[name] == first[name] > 0, name
    assert first['ingest_shards_committed_total{worker="1"}'] == 7
    assert first['ingest_images_total{split="train",worker="1"}'] + \
        first['ingest_images_total{split="val",worker="1"}'] == 28
    assert any(name.startswith("ingest_info{") and 'worker="1"' in name and 'workers="2"' in name for name in first)
    # The time per shard counts this run's commits only (the ETA's mean), none of a rerun's inherited ones.
    assert first['ingest_shard_seconds_count{worker="1"}'] == 7 and first['ingest_shard_seconds_sum{worker="1"}'] > 0
    assert again['ingest_shard_seconds_count{worker="1"}'] == again['ingest_shard_seconds_sum{worker="1"}'] == 0


def test_a_metrics_port_out_of_range_or_in_use_is_one_line_and_exit_2_before_any_work(tmp_path):
    import socket

    from ingest.errors import EXIT_USAGE

    from .conftest import run_cli

    source = tmp_path / "tiny-imagenet-200"
    synth.generate(str(source), classes=2, train_per_class=2, val_per_class=1, size=32)
    out = tmp_path / "out"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, message in ((70000, "metrics port 70000 must be in 1..65535"), (0, "metrics port 0 must be in"),
                              (port, f"--metrics-port: cannot serve metrics on port {port}: ")):
            result = run_cli("ingest.shard", "--input", source, "--output", out, "--processes", "1",
                             "--metrics-port", flag)
            assert result.returncode == EXIT_USAGE and "Traceback" not in result.stderr, result.stderr
            errors = [line for line in result.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and message in errors[0], result.stderr
            assert not out.exists()   # refused before the output was touched

"""The trainer's shard readers against a flaky object store (and a soak through S3): bench.faultproxy in front of moto_server
answers 500 / 503 / SlowDown, drops connections or cuts answers short. Transient faults are retried
and lose nothing; a permanent one skips the shard (named and counted), or stops the run with a
message naming the object when it is the manifest."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import s3fs

from bench.faultproxy import Rule, fault_proxy
from trainer.data import Dataset, InputConfig
from trainer.shards import ReadStats

from .conftest import run_cli, use_s3_endpoint


@pytest.fixture(scope="module")
def s3_shards(train_shards, s3_endpoint):
    """The trainer tests' data set, uploaded as-is to a bucket of the shared moto_server."""
    import boto3

    from bench.servers import S3_TEST_ENV

    client = boto3.client("s3", endpoint_url=s3_endpoint, **{
        "aws_access_key_id": S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"})
    client.create_bucket(Bucket="faults")
    for path in train_shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "faults", f"shards/{path.relative_to(train_shards)}")
    return "s3://faults/shards"


@pytest.fixture
def through(s3_endpoint, monkeypatch):
    """Start a fault proxy with the given rules and point the S3 client at it."""
    proxies = []

    def start(rules):
        context = fault_proxy(s3_endpoint, rules)
        proxy = context.__enter__()
        proxies.append(context)
        use_s3_endpoint(monkeypatch, proxy.url)
        return proxy

    yield start
    for context in proxies:
        context.__exit__(None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


def val_labels(url: str, stats: ReadStats) -> np.ndarray:
    dataset = Dataset(InputConfig(data=url, batch_size=32), stats)
    return np.concatenate([y.numpy() for _, y in dataset.evaluate("val")])


@pytest.mark.parametrize("fault", ["internal_error", "service_unavailable", "slow_down", "close_before", "truncate"])
def test_transient_faults_are_retried_and_lose_nothing(s3_shards, through, fault):
    # Two faults in a row on each of the 2 val shards: the storage libraries' retries absorb them (the trainer
    # has none). A rule per shard: one rule of 4 over both dealt them to whichever reader asked first (3 + 1 seen).
    rules = [Rule(fault, method="GET", path=rf"val-00000{shard}\.tar", count=2) for shard in range(2)]
    through(rules)
    stats = ReadStats()
    labels = val_labels(s3_shards, stats)
    assert [rule.fired for rule in rules] == [2, 2]
    assert len(labels) == 100 and stats.skipped_shards == Counter()


def test_a_shard_that_stays_unreadable_is_skipped_named_and_counted(s3_shards, through, caplog):
    through([Rule("access_denied", method="GET", path=r"val-000001\.tar", count=None)])
    stats = ReadStats()
    labels = val_labels(s3_shards, stats)
    assert len(labels) == 100 - 50
    assert stats.skipped_shards == Counter({"unreadable": 1})
    assert any("val-000001.tar skipped (unreadable)" in r.getMessage() for r in caplog.records)


def test_an_unreadable_manifest_stops_training_with_a_message_naming_it(s3_shards, through, tmp_path):
    through([Rule("access_denied", method="GET", path=r"manifest\.json", count=None)])
    result = run_cli("trainer.train", "--data", s3_shards, "--output", tmp_path / "out", "--preset", "seed-model1",
                     "--epochs", "1")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_a_long_read_through_s3_leaks_no_file_handles_or_threads(s3_shards, s3_endpoint, monkeypatch):
    from bench.soak import soak

    # Straight to moto_server (another process): the proxy's own sockets and threads would be counted.
    use_s3_endpoint(monkeypatch, s3_endpoint)
    samples = soak(s3_shards, epochs=8, batch_size=50)
    settled = samples[2:]   # after the first epochs opened the connections and started the threads
    assert [s.images for s in settled] == [1000 + 100] * len(settled)
    assert max(s.fds for s in settled) <= samples[1].fds + 2, [s.fds for s in samples]
    assert max(s.threads for s in settled) <= samples[1].threads + 2, [s.threads for s in samples]

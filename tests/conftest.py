"""Shared fixtures: a real S3 endpoint (moto_server on 127.0.0.1), CLI runner, synthetic data sets."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.servers import S3_TEST_ENV, moto_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto_server subprocess: a real HTTP S3 API, as s3fs's own tests use."""
    with moto_server() as endpoint:
        yield endpoint


def use_s3_endpoint(monkeypatch, endpoint: str) -> None:
    """Point every S3 client of this process (and of the CLIs it starts) at `endpoint`, with the test
    credentials, through the environment as in production."""
    import s3fs

    for key, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()   # a cached client would keep the old endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; credentials and endpoint come from the environment, as in production."""
    import boto3
    import s3fs

    use_s3_endpoint(monkeypatch, s3_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()


def run_cli(module: str, *args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root, as a user would run it (`env`: changes to the environment)."""
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """A learnable 10-class, 64 px data set, ingested: what the trainer tests train on."""
    from ingest import synth

    base = tmp_path_factory.mktemp("train")
    synth.generate(str(base / "tiny"), classes=10, train_per_class=100, val_per_class=10, seed=2)
    run_cli("ingest.shard", "--input", base / "tiny", "--output", base / "shards", "--shard-size", "50",
            "--processes", "1", check=True)
    return base / "shards"

"""Ingest to and verify from a real S3 API (moto_server on 127.0.0.1), credentials from the environment."""
from __future__ import annotations

import os

import fsspec
import pytest

from ingest import synth
from ingest.errors import EXIT_INCOMPLETE, EXIT_OUTPUT, EXIT_USAGE

from .conftest import run_cli
from .helpers import read_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200.zip"
    truth = synth.generate(str(path), classes=4, train_per_class=8, val_per_class=3, size=32, seed=2,
                           quirks=True, zip=True)
    local = tmp_path_factory.mktemp("local") / "shards"
    run_cli("ingest.shard", "--input", path, "--output", local, "--shard-size", "5", "--processes", "1", check=True)
    return truth, path, local


def test_s3_dataset_equals_local_dataset_and_verifies(tiny, s3_bucket):
    _, source, local = tiny
    url = f"s3://{s3_bucket}/tiny"
    result = run_cli("ingest.shard", "--input", source, "--output", url, "--shard-size", "5", "--processes", "2",
                     check=True)
    assert f"dataset {url}" in result.stdout
    assert read_dataset(url) == read_dataset(str(local))
    assert run_cli("ingest.verify", url, check=True).stdout.startswith("ok:")
    rerun = run_cli("ingest.shard", "--input", source, "--output", url, "--shard-size", "5", check=True)
    assert "0 shards written" in rerun.stdout


def test_input_zip_read_from_s3(tiny, s3_bucket):
    _, source, local = tiny
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3_bucket}")
    fs.put_file(str(source), f"{s3_bucket}/downloads/tiny-imagenet-200.zip")
    out = f"s3://{s3_bucket}/from-s3"
    run_cli("ingest.shard", "--input", f"s3://{s3_bucket}/downloads/tiny-imagenet-200.zip", "--output", out,
            "--shard-size", "5", "--processes", "2", check=True)
    manifest, samples = read_dataset(out)
    local_manifest, local_samples = read_dataset(str(local))
    assert samples == local_samples
    assert manifest["splits"] == local_manifest["splits"]


def test_endpoint_as_storage_option(tiny, s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    url = f"s3://{s3_bucket}/opt"
    for module, args in (("ingest.shard", ["--input", tiny[1], "--output", url, "--processes", "1"]),
                         ("ingest.verify", [url])):
        result = run_cli(module, *args, "--storage-option", f"endpoint_url={s3_endpoint}")
        assert result.returncode == 0, result.stderr


def test_verify_names_a_tampered_object(tiny, s3_bucket):
    url = f"s3://{s3_bucket}/tamper"
    run_cli("ingest.shard", "--input", tiny[1], "--output", url, "--shard-size", "5", "--processes", "1", check=True)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/val-000000.tar", fs.cat_file(f"{root}/val-000000.tar")[:-1024])
    result = run_cli("ingest.verify", url)
    assert result.returncode == EXIT_INCOMPLETE and "val-000000.tar: size" in result.stdout


def test_missing_bucket_is_a_clean_error(tiny, s3_bucket):
    result = run_cli("ingest.shard", "--input", tiny[1], "--output", "s3://no-such-bucket-here/x")
    assert result.returncode == EXIT_OUTPUT
    assert "Traceback" not in result.stderr
    assert "error: output s3://no-such-bucket-here/x: bucket or directory does not exist" in result.stderr


def test_credentials_are_never_printed_or_stored(tiny, s3_bucket):
    url = f"s3://{s3_bucket}/secret"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    result = run_cli("ingest.shard", "--input", tiny[1], "--output", url, "--processes", "1", "--log-level", "DEBUG",
                     check=True)
    assert secret not in result.stdout + result.stderr
    fs, root = fsspec.core.url_to_fs(url)
    for path in fs.find(root):
        if path.endswith(".json"):
            assert secret.encode() not in fs.cat_file(path), path


def test_credentials_on_the_command_line_are_refused_without_echo(tiny, s3_bucket):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    result = run_cli("ingest.shard", "--input", tiny[1], "--output", f"s3://{s3_bucket}/x",
                     "--storage-option", f"secret={secret}")
    assert result.returncode == EXIT_USAGE and "looks like a credential" in result.stderr
    assert secret not in result.stdout + result.stderr

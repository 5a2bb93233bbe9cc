"""Local servers for benchmarks and tests on 127.0.0.1: moto_server (a real S3 API), and any
server binary started until its readiness URL answers (Prometheus, Pushgateway)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator

S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(span: int = 1) -> int:
    """A port that is free on 127.0.0.1, with the `span - 1` ports after it (a base port + rank)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if all(_free(port + offset) for offset in range(1, span)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def local_server(command: list[str], ready_url: str, timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """Run `command` until its `ready_url` answers; stop it on exit."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        _wait_ready(process, ready_url, timeout)
        yield process
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def moto_server(timeout: float = 30.0, ranged: bool = False) -> Iterator[str]:
    """Start moto_server (from the moto[server] extra, beside this Python) and yield its endpoint URL.
    `ranged`: bench.moto_ranged's, which serves a ranged GET without reading the whole object."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = [sys.executable, "-m", "bench.moto_ranged"] if ranged else [str(Path(sys.executable).parent / "moto_server")]
    command = [*server, "-H", "127.0.0.1", "-p", str(port)]
    with local_server(command, f"{endpoint}/moto-api/", timeout):
        yield endpoint


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} did not answer at {url}") from None
            time.sleep(0.2)


def s3_bucket(stack: contextlib.ExitStack, bucket: str = "bench") -> str:
    """A bucket on a moto_server (one server per run, bench.moto_ranged's), with the environment set
    so that child processes reach it too; an AWS_ENDPOINT_URL already set is used instead."""
    import boto3

    if "AWS_ENDPOINT_URL" not in os.environ:
        endpoint = stack.enter_context(moto_server(ranged=True))
        os.environ.update({**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint})
    client = boto3.client("s3")
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def upload(stack: contextlib.ExitStack, path: Path, url: str) -> str:
    """The directory `path` copied to the S3 `url` (its bucket made by s3_bucket)."""
    import fsspec

    s3_bucket(stack, url.removeprefix("s3://").split("/", 1)[0])
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(f"{path}/", root, recursive=True)
    return url.rstrip("/")

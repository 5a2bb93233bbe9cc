"""`python -m ingest.wait` (the chart's init container wait-for-data) as a subprocess: it ends when the
manifest appears, gives up when the ingest Job has failed, and waits on the data alone without access.

No Kubernetes cluster here, and no kube-apiserver installs from PyPI or Debian (Debian has kubectl and
etcd, not the API server): the Kubernetes API is a small real HTTP server serving the one request the
module makes, GET /apis/batch/v1/namespaces/NS/jobs/NAME, with a Job as the API server returns it.
The kubernetes client reaches it through a kubeconfig ($KUBECONFIG: the path taken outside a pod)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bench.servers import free_port
from ingest.errors import EXIT_INPUT

from .conftest import REPO

NAMESPACE, JOB = "ml", "t-trainer-ingest"
JOB_PATH = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{JOB}"
TOKEN = "test-token"


def job(conditions: list[dict] | None = None, active: int = 2) -> dict:
    """A batch/v1 Job as the API server returns it: running (`active` pods), or with conditions."""
    status = {"startTime": "2026-12-01T10:00:00Z", "active": active, "ready": active, "failed": 0,
              "uncountedTerminatedPods": {}, "terminating": 0}
    if conditions:
        status = {**status, "active": 0, "ready": 0, "failed": 4, "conditions": conditions}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": JOB, "namespace": NAMESPACE, "uid": "5f0c6a0e-1b1e-4c52-9d6a-1a1a1a1a1a1a",
                     "resourceVersion": "4242", "creationTimestamp": "2026-12-01T10:00:00Z",
                     "labels": {"app.kubernetes.io/component": "ingest"}},
        "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 6,
                 "podReplacementPolicy": "Failed", "suspend": False,
                 "template": {"spec": {"restartPolicy": "Never",
                                       "containers": [{"name": "ingest", "image": "imagenet-k8s-trainer:0.1.0-cpu"}]}}},
        "status": status,
    }


FAILED = job([
    {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
     "message": "Job has reached the specified backoff limit",
     "lastProbeTime": "2026-12-01T11:00:00Z", "lastTransitionTime": "2026-12-01T11:00:00Z"},
    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
     "message": "Job has reached the specified backoff limit",
     "lastProbeTime": "2026-12-01T11:00:01Z", "lastTransitionTime": "2026-12-01T11:00:01Z"}])
FORBIDDEN = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden",
             "code": 403,
             "message": f'jobs.batch "{JOB}" is forbidden: User "system:serviceaccount:ml:t-trainer" cannot get '
                        f'resource "jobs" in API group "batch" in the namespace "ml"',
             "details": {"name": JOB, "group": "batch", "kind": "jobs"}}


class FakeAPI(ThreadingHTTPServer):
    """Answers GET JOB_PATH with `self.answer` (status, JSON); records every request's path and token."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeAPIHandler)
        self.answer: tuple[int, dict] = (200, job())
        self.requests: list[tuple[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class FakeAPIHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Authorization", "")))
        status, body = self.server.answer if self.path.split("?")[0] == JOB_PATH else (404, {"kind": "Status"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def api():
    server = FakeAPI()
    yield server
    server.shutdown()
    server.server_close()


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}]}))
    return path


def start_wait(data: Path, config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "ingest.wait", str(data), f"--job={JOB}",
                                 f"--namespace={NAMESPACE}", "--poll-interval=0.2"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**env, "KUBECONFIG": str(config)})


def wait_for(condition, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def polls(log: Path) -> int:
    return log.read_text().count("manifest.json (the ingest writes it last)")


def test_it_ends_when_the_manifest_appears_while_the_job_runs(api, tmp_path):
    data, log = tmp_path / "shards", tmp_path / "wait.log"
    process = start_wait(data, kubeconfig(tmp_path / "config", f"http://127.0.0.1:{api.server_port}"), log)
    try:
        wait_for(lambda: polls(log) >= 3, process, log)
        data.mkdir()
        (data / "manifest.json").write_text("{}")
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        process.kill()
    assert f"{data}/manifest.json is there" in log.read_text() and "cannot read" not in log.read_text()
    assert api.requests and all(r == (JOB_PATH, f"Bearer {TOKEN}") for r in api.requests)


def test_it_gives_up_with_one_line_once_the_ingest_job_has_failed(api, tmp_path):
    data, log = tmp_path / "shards", tmp_path / "wait.log"
    process = start_wait(data, kubeconfig(tmp_path / "config", f"http://127.0.0.1:{api.server_port}"), log)
    try:
        wait_for(lambda: polls(log) >= 2, process, log)   # the Job runs: it waits
        api.answer = (200, FAILED)
        assert process.wait(timeout=60) == EXIT_INPUT, log.read_text()
    finally:
        process.kill()
    text = log.read_text()
    assert text.splitlines()[-1] == (f"error: ingest Job {NAMESPACE}/{JOB} has failed (BackoffLimitExceeded: Job "
                                     f"has reached the specified backoff limit): {data}/manifest.json will never be "
                                     f"written")
    assert "Traceback" not in text


@pytest.mark.parametrize("access", ["forbidden", "unreachable"])
def test_without_access_to_the_job_it_says_so_once_and_waits_on_the_data(api, tmp_path, access):
    data, log = tmp_path / "shards", tmp_path / "wait.log"
    api.answer = (403, FORBIDDEN)
    server = f"http://127.0.0.1:{api.server_port if access == 'forbidden' else free_port()}"
    process = start_wait(data, kubeconfig(tmp_path / "config", server), log)
    try:
        wait_for(lambda: polls(log) >= 5, process, log)
        data.mkdir()
        (data / "manifest.json").write_text("{}")
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        process.kill()
    warnings = [line for line in log.read_text().splitlines() if line.startswith("cannot read the status")]
    problem = "HTTP 403 Forbidden" if access == "forbidden" else "API not reachable ("
    assert len(warnings) == 1 and f"ingest Job {NAMESPACE}/{JOB}: {problem}" in warnings[0], log.read_text()
    assert warnings[0].endswith("waiting on the data alone") and "Traceback" not in log.read_text()
    if access == "forbidden":
        assert len(api.requests) >= 5   # still asking: access may be granted while it waits


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in ((["foo://x"], "cannot open foo://x: Protocol not known: foo"),
                          ([str(tmp_path), "--poll-interval=0"], "--poll-interval: 0 is not in (0, 3600] seconds")):
        result = subprocess.run([sys.executable, "-m", "ingest.wait", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr


def test_the_charts_init_container_gives_up_on_its_release_s_failed_ingest(api, tmp_path, monkeypatch):
    """The rendered wait-for-data: it asks for the Job the chart's Role lets it get, in the release's namespace."""
    from .test_chart import find, render, scenario, start_pod

    data = tmp_path / "shards"
    values = {**scenario("default"), "data": {"url": str(data)}, "ingest": {"enabled": True, "input": "/raw"}}
    objects, _ = render(values)
    [wait] = find(objects, "Job", "t-trainer")["spec"]["template"]["spec"]["initContainers"]
    [rule] = find(objects, "Role", "t-trainer-wait-for-data")["rules"]
    assert rule["resourceNames"] == [JOB]   # and the release's namespace is ml: the API path it serves
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "config", f"http://127.0.0.1:{api.server_port}")))
    api.answer = (200, FAILED)
    log = tmp_path / "wait.log"
    process = start_pod(wait, 0, {}, log)
    assert process.wait(timeout=60) == EXIT_INPUT, log.read_text()
    last = log.read_text().splitlines()[-1]
    assert last.startswith(f"error: ingest Job {NAMESPACE}/{JOB} has failed (BackoffLimitExceeded")
    assert api.requests == [(JOB_PATH, f"Bearer {TOKEN}")]


def test_an_empty_or_malformed_url_is_one_line_and_exit_2():
    # Each would otherwise wait forever on a manifest.json nobody writes (`''`: the working directory's).
    cases = {"": "URL is empty", "   ": "URL is empty", " s3://b/x": "leading or trailing white space",
             "s3://": "names no bucket or path after s3://", "file:///": "names no bucket or path after file://",
             "s3:///": "names no bucket or path after s3://", "s3:/b/x": "one slash after s3:",
             "://x": "no protocol before ://", "s 3://b": "no protocol before ://"}
    for url, message in cases.items():
        result = subprocess.run([sys.executable, "-m", "ingest.wait", url, "--poll-interval=0.1"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (url, result.stderr)
        [error] = [line for line in result.stderr.splitlines() if "error:" in line]
        assert message in error and f"{url!r}" in error if url.strip() else message in error, (url, error)

"""Rendezvous attempts (trainer.launch, trainer.rendezvous): a replaced pod never registers into the
store of an attempt that is still alive but can no longer complete. Real launchers as separate
processes on 127.0.0.1, each "pod" in a process group of its own, as a node would hold it."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import free_port
from trainer.errors import EXIT_ATTEMPT_ENDED
from trainer.launch import host_plan
from trainer.rendezvous import AttemptServer, Relay

from .conftest import REPO

WORKER = REPO / "tests" / "distributed" / "rendezvous_worker.py"


class Pod:
    """Pod `index` of a local N-pod Indexed Job: `python -m trainer.launch` as the chart runs it, with
    pod 0's name mapped to 127.0.0.1. Gloo's start-up wait as the chart sets it (not its default 30 s)."""

    def __init__(self, index: int, pods: int, port: int, stop: Path, log: Path):
        self.log = log
        command = [sys.executable, "-m", "trainer.launch", f"--pods={pods}", f"--pod-index={index}",
                   "--host-template=pod-{index}", "--rendezvous-addr=127.0.0.1", f"--port={port}", "--iface=lo",
                   "--rendezvous-timeout=120", "--", sys.executable, str(WORKER), str(stop)]
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "HOROVOD_GLOO_TIMEOUT_SECONDS": "120"},
                                            start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def ranks(self) -> list[dict]:
        """The ranks of this pod that got through Horovod's rendezvous."""
        return [json.loads(line) for line in self.text().splitlines() if line.startswith('{"rank"')]

    def signal(self, signum: int) -> None:
        """To the whole pod: its launcher and every rank."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)


def wait_until(condition, seconds: float, what: str, pods: list[Pod]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log.name} (exit {p.process.poll()}):\n{p.text()[-2500:]}" for p in pods)
            raise AssertionError(f"not within {seconds} s: {what}\n{logs}")
        time.sleep(0.2)


def test_a_replaced_pod_never_joins_the_attempt_it_was_replaced_from(tmp_path):
    """Pod 1's node is lost (frozen: no TCP reset reaches anyone) and the Job replaces pod 1 at once, while
    pod 0 and its rendezvous server live on, pod 0's rank blocked in an allreduce with the lost rank. The
    replacement must not register into that attempt's store (its peer is gone: it would wait there until
    Gloo's timeout and fail): pod 0 ends the attempt at once, the replacement waits, and with pod 0 replaced
    too the two rendezvous again and complete."""
    port, stop = free_port(), tmp_path / "stop"
    first = [Pod(i, 2, port, stop, tmp_path / f"pod-{i}.log") for i in range(2)]
    pods = list(first)
    try:
        wait_until(lambda: all(p.ranks() for p in first), 180, "both ranks of the first attempt ready", pods)
        first[1].signal(signal.SIGSTOP)
        replacement = Pod(1, 2, port, stop, tmp_path / "pod-1-replacement.log")
        pods.append(replacement)

        wait_until(lambda: first[0].process.poll() is not None, 60, "pod 0 ended its attempt", pods)
        assert first[0].process.returncode == EXIT_ATTEMPT_ENDED, first[0].text()[-3000:]
        assert "pod 1 joined rendezvous attempt" in first[0].text() and "again" in first[0].text()
        assert replacement.process.poll() is None and not replacement.ranks(), replacement.text()[-3000:]
        assert "waiting for pod 0's next attempt" in replacement.text()

        second = Pod(0, 2, port, stop, tmp_path / "pod-0-replacement.log")
        pods.append(second)
        wait_until(lambda: second.ranks() and replacement.ranks(), 180, "the second attempt's ranks ready", pods)
        assert [r["rank"] for r in second.ranks() + replacement.ranks()] == [0, 1]
        assert {r["size"] for r in second.ranks() + replacement.ranks()} == {2}
        stop.touch()
        for pod in (second, replacement):
            assert pod.process.wait(timeout=60) == 0, pod.text()[-3000:]
    finally:
        for pod in pods:
            pod.signal(signal.SIGKILL)   # a stopped process dies of SIGKILL too
            pod.process.wait(timeout=60)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_a_store_serves_one_attempt_and_ends_it_when_a_pod_joins_twice():
    server = AttemptServer(("127.0.0.1", free_port()), host_plan(2, 1, "pod-{index}"))
    port = server.server_address[1]
    ours, stale = Relay("127.0.0.1", port, server.attempt), Relay("127.0.0.1", port, "0ld0a77e")
    try:
        # Horovod's keys, through a pod's relay: this attempt's are served, another attempt's are gone.
        assert request(ours.server_port, "PUT", "/global/1", b"rank 1's address") == (200, b"")
        assert request(ours.server_port, "GET", "/global/1") == (200, b"rank 1's address")
        assert request(ours.server_port, "GET", "/global/0")[0] == 404   # not there yet: Gloo polls again
        assert request(stale.server_port, "GET", "/global/1")[0] == 410
        assert request(stale.server_port, "PUT", "/global/0", b"a dead rank's address")[0] == 410

        assert request(port, "GET", "/join/1/launcher-a") == (200, server.attempt.encode())
        assert request(port, "GET", "/join/1/launcher-a") == (200, server.attempt.encode())   # an answer lost: again
        assert not server.ended.is_set()
        status, text = request(port, "GET", "/join/1/launcher-b")   # pod 1 replaced
        assert status == 409 and b"had pod 1 already" in text and server.ended.is_set()
        assert request(port, "GET", "/join/1/launcher-c")[0] == 410
        assert request(ours.server_port, "GET", "/global/1")[0] == 410   # its ranks stop too
    finally:
        for http_server in (ours, stale, server):
            http_server.shutdown()
            http_server.server_close()


def test_a_pod_that_no_attempt_admits_gives_up_with_one_line():
    server = AttemptServer(("127.0.0.1", free_port()), host_plan(2, 1, "pod-{index}"))
    port = server.server_address[1]
    request(port, "GET", "/join/1/gone")
    request(port, "GET", "/join/1/replacement")   # the attempt has ended
    try:
        result = subprocess.run([sys.executable, "-m", "trainer.launch", "--pods=2", "--pod-index=1",
                                 "--host-template=pod-{index}", "--rendezvous-addr=127.0.0.1", f"--port={port}", "--rendezvous-timeout=3", "--",
                                 sys.executable, "-c", "raise SystemExit('a rank started')"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr and "a rank started" not in result.stderr
    assert lines[-1] == (f"trainer.launch: no rendezvous attempt at 127.0.0.1:{port} admitted pod 1 within 3 s "
                         f"(--rendezvous-timeout): rendezvous attempt {server.attempt} has ended")
    assert lines.count(f"trainer.launch: rendezvous attempt {server.attempt} has ended; waiting for pod 0's next "
                       f"attempt") == 1

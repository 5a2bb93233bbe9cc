"""The Kubernetes launcher: host plan and environment, and its local mode running real pods."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.servers import free_port
from trainer.launch import host_plan, slot_environment

from .conftest import REPO


def test_host_plan_matches_horovodrun():
    plan = host_plan(2, 2, "trainer-{index}.trainer")
    assert [(s.hostname, s.rank, s.local_rank, s.cross_rank) for s in plan] == [
        ("trainer-0.trainer", 0, 0, 0), ("trainer-0.trainer", 1, 1, 0),
        ("trainer-1.trainer", 2, 0, 1), ("trainer-1.trainer", 3, 1, 1)]
    env = slot_environment(plan[3], "trainer-0.trainer", 29500, "eth0")
    assert env["HOROVOD_RANK"] == "3" and env["HOROVOD_SIZE"] == "4" and env["HOROVOD_LOCAL_SIZE"] == "2"
    assert env["HOROVOD_CROSS_SIZE"] == "2" and env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "trainer-0.trainer"
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.launch", "--port", str(free_port()), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_local_pods_train_together(train_shards, tmp_path):
    result = launch("--local-pods", "2", "--", sys.executable, "tests/distributed/check_training.py",
                    str(train_shards), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["size"] == 2
    assert ranks[0]["checksums"][0] == ranks[0]["checksums"][1]


def test_local_pods_serve_metrics_on_ports_of_their_own(train_shards, tmp_path):
    # Local pods share 127.0.0.1: each pod's metrics ports come after the previous pod's (both were P + 0).
    result = launch("--local-pods", "2", "--", sys.executable, "-m", "trainer.train", "--data", str(train_shards),
                    "--output", str(tmp_path / "out"), "--preset", "seed-model1", "--epochs", "1",
                    "--batch-size", "64", "--metrics-port", str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_failing_rank_stops_the_job_fast():
    # Rank 0 never ends by itself (as one waiting for a peer whose node vanished without a TCP reset):
    # the job ends only if the launchers stop the other ranks at the first failure, so ending at all,
    # with rank 1's code, is the check. The timeout of launch() only bounds how long a hang takes to fail.
    script = ("import signal, sys, horovod.tensorflow as hvd; hvd.init()\n"
              "if hvd.rank() == 1: sys.exit(3)\n"
              "signal.pause()")
    result = launch("--local-pods", "2", "--", sys.executable, "-c", script)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "trainer.launch: pod 1 exited with code 3; stopping the others" in result.stderr


def test_local_mode_refuses_more_pods_than_one_machine_should_run():
    result = launch("--local-pods", "500", "--", sys.executable, "-c", "pass", timeout=60)
    assert result.returncode == 2 and "--local-pods 500 must be in 1..16" in result.stderr


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The launcher's refusal: exit 2, no traceback, and exactly one line saying what is wrong."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    return error


def test_every_flag_is_checked_before_anything_starts(tmp_path):
    # Before: tracebacks (a template with {idx}, port 70000), a hang (0 slots: no rank ever), "0..-1", and a
    # negative timeout taken. Each pod mode case would serve or join a rendezvous if it got that far.
    cases = {("--host-template", "pod-{idx}"): "--host-template 'pod-{idx}': {idx} is not {index}",
             ("--pods", "2", "--host-template", "pod"): "--host-template 'pod': must contain {index}",
             ("--host-template", "pod-{index}-{}"): "--host-template 'pod-{index}-{}': {} is not {index}",
             ("--host-template", "pod-{index"): "--host-template 'pod-{index':",
             ("--host-template", "pod-{index:s}"): "--host-template 'pod-{index:s}':",
             ("--host-template", "pod {index}"): "--host-template 'pod {index}': gives 'pod 0', not a host name",
             ("--rendezvous-addr", ""): "--rendezvous-addr '' is not a host name or IP address",
             ("--rendezvous-addr", "http://pod-0"): "--rendezvous-addr 'http://pod-0' is not a host name",
             ("--port", "70000"): "--port 70000 must be in 1..65535",
             ("--port", "0"): "--port 0 must be in 1..65535",
             ("--pods", "0"): "--pods 0 must be >= 1",
             ("--slots", "0"): "--slots 0 must be >= 1",
             ("--local-pods", "2", "--slots", "0"): "--slots 0 must be >= 1",
             ("--pods", "2", "--pod-index", "2", "--host-template", "p{index}"): "pod index 2 must be in 0..1",
             ("--rendezvous-timeout", "-1"): "--rendezvous-timeout -1 must be a number of seconds above 0",
             ("--rendezvous-timeout", "nan"): "--rendezvous-timeout nan must be a number of seconds above 0",
             ("--iface", "nosuch9"): "--iface nosuch9: no such network interface here (there are: "}
    for args, message in cases.items():
        error = one_error_line(launch(*args, "--", sys.executable, "-c", "pass", timeout=30))
        assert message in error, (args, error)
    env = {**os.environ, "JOB_COMPLETION_INDEX": "x"}
    result = subprocess.run([sys.executable, "-m", "trainer.launch", "--", "true"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=30)
    assert "--pod-index: invalid int value: 'x'" in one_error_line(result)


def test_a_command_that_cannot_start_is_one_line_and_exit_2(tmp_path):
    plain = tmp_path / "train.sh"
    plain.write_text("echo hi\n")   # not executable
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF nonsense")
    garbage.chmod(0o755)   # executable, but no program: only exec() can tell
    cases = {("--", "/nonexistent"): "cannot start /nonexistent: no such file",
             ("--", "no-such-command-x9"): "cannot start no-such-command-x9: not found on PATH",
             ("--", str(plain)): f"cannot start {plain}: not executable",
             ("--", str(tmp_path)): f"cannot start {tmp_path}: a directory",
             ("--local-pods", "2", "--", "/nonexistent"): "cannot start /nonexistent: no such file",
             ("--", str(garbage)): f"cannot start {garbage}: Exec format error"}
    for args, message in cases.items():
        error = one_error_line(launch(*args, timeout=30))
        assert message in error, (args, error)


def test_a_rendezvous_port_in_use_is_one_line_and_exit_2():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch("--port", str(port), "--rendezvous-addr", "127.0.0.1", "--iface", "lo", "--",
                        sys.executable, "-c", "pass", timeout=30)
    assert f"--port: pod 0 cannot serve the rendezvous on port {port}: " in one_error_line(result)

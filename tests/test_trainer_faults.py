"""Training faults: a worker killed mid-epoch fails the job fast with a clear message and the same
command resumes; a checkpoint interrupted mid-write is never the one resumed from."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.servers import free_port
from trainer.errors import EXIT_PEER_LOST

from .conftest import REPO, run_cli

# A bound on "fails fast": generous for a loaded 2-core machine, far below a hung allreduce (forever).
NO_HANG_SECONDS = 180


@pytest.fixture
def shards(train_shards):
    return train_shards


def ranks_of(marker: str) -> dict[int, int]:
    """pid of each training process whose command line contains `marker`, by Horovod rank."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:   # gone, or not ours
            continue
        if marker in cmdline and "trainer.train" in cmdline:
            for entry in environ:
                if entry.startswith(b"HOROVOD_RANK="):
                    found[int(entry.split(b"=")[1])] = int(pid)
    return found


@contextlib.contextmanager
def chart_pods(shards: Path, out: Path):
    """Pods of a 2-pod job as the chart runs them (a launcher each, in its own process group), once the
    run has its first checkpoint."""
    port = free_port()
    train = [sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
             "--preset", "seed-model1", "--batch-size", "16", "--epochs", "30"]
    pods = [subprocess.Popen([sys.executable, "-m", "trainer.launch", "--pods=2", f"--pod-index={index}",
                              "--host-template=pod-{index}", "--rendezvous-addr=127.0.0.1", f"--port={port}",
                              "--iface=lo", "--", *train], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True) for index in range(2)]
    try:
        while not (out / "checkpoints" / "latest.json").exists():
            assert all(pod.poll() is None for pod in pods), [pod.communicate()[1][-2000:] for pod in pods]
            time.sleep(0.2)
        yield pods
    finally:
        for pod in pods:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.pid, signal.SIGKILL)
            pod.wait()


def test_a_pod_that_loses_another_exits_with_its_own_code(shards, tmp_path):
    """Pod 1 is deleted (its processes killed) mid-run. Pod 0's rank loses it in the next allreduce and
    its pod exits 9, which the Job does not count against backoffLimit (the lost pod's failure, or its
    disruption, is the incident)."""
    with chart_pods(shards, tmp_path / "out") as pods:
        os.killpg(pods[1].pid, signal.SIGKILL)
        _, stderr = pods[0].communicate(timeout=NO_HANG_SECONDS)
    assert pods[0].returncode == EXIT_PEER_LOST, stderr[-3000:]
    assert "error: rank 0: lost another worker" in stderr and "Traceback" not in stderr


def test_a_pod_stopped_with_a_preempted_one_exits_with_the_code_of_a_consequence(shards, tmp_path):
    """Pod 1 is preempted (SIGTERM to its launcher, as the kubelet sends it). Both pods checkpoint at the
    same step boundary; pod 1 exits 143 (the Job ignores it: DisruptionTarget), pod 0, which got no
    SIGTERM, exits 9 (ignored too): a preemption costs the Job nothing."""
    with chart_pods(shards, tmp_path / "out") as pods:
        pods[1].send_signal(signal.SIGTERM)
        _, stderr = pods[0].communicate(timeout=NO_HANG_SECONDS)
        pods[1].wait(timeout=NO_HANG_SECONDS)
    assert (pods[0].returncode, pods[1].returncode) == (EXIT_PEER_LOST, 143), stderr[-3000:]
    assert "error: rank 0: another worker got SIGTERM; checkpoint written at epoch" in stderr
    assert "Traceback" not in stderr and "terminated" not in stderr


def test_a_worker_killed_mid_epoch_fails_the_job_fast_and_the_same_command_resumes(shards, tmp_path):
    out = tmp_path / "out"
    train = [sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
             "--preset", "seed-model1", "--batch-size", "16", "--epochs", "4"]

    def launch() -> list[str]:
        return [sys.executable, "-m", "trainer.launch", "--local-pods", "2", "--port", str(free_port()), "--", *train]

    job = subprocess.Popen(launch(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoints" / "latest.json").exists():   # epoch 0 is committed
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(ranks_of(str(out))[1], signal.SIGKILL)
        _, stderr = job.communicate(timeout=NO_HANG_SECONDS)
    finally:
        job.kill()
    assert job.returncode != 0
    assert "rank 1 was killed by SIGKILL; stopping the others" in stderr
    assert "error: rank 0: lost another worker" in stderr and "Traceback" not in stderr
    assert not (out / "results.json").exists()
    killed_at = json.loads((out / "checkpoints" / "latest.json").read_text())["next_epoch"]

    rerun = subprocess.run(launch(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["start_epoch"] == killed_at >= 1 and results["epochs_run"] == 4


@pytest.mark.parametrize("mode", ["torn", "unnamed"])
def test_a_checkpoint_interrupted_mid_write_is_never_resumed_from(shards, tmp_path, mode):
    out = tmp_path / "out"
    args = ["--data", str(shards), "--output", str(out), "--preset", "seed-model1", "--batch-size", "64"]
    killed = subprocess.run([sys.executable, "tests/distributed/interrupt_checkpoint.py", mode, "1", *args,
                             "--epochs", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "epoch-0001.npz").exists()       # written (in part), never named
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["state"] == "checkpoints/epoch-0000.npz"

    resumed = run_cli("trainer.train", *args, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["start_epoch"] == 1 and results["epochs_run"] == 3
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert [h["epoch"] for h in latest["history"]] == [0, 1, 2]


def test_training_data_that_disappears_stops_the_run_with_one_line(shards, tmp_path):
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    for path in gone.glob("train-*.tar"):
        path.unlink()
    result = run_cli("trainer.train", "--data", gone, "--output", tmp_path / "out", "--preset", "seed-model1",
                     "--epochs", "1")
    assert result.returncode == 1, result.stderr[-3000:]   # perhaps an outage: a Job retries it
    assert "error: reading the training data: 20 shards in a row could not be read" in result.stderr, \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def alive(pid: int) -> bool:
    """Running or stopped; not gone and not a zombie (dead, waiting to be reaped by whoever adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_frozen_rank_ends_the_job_within_the_stall_timeout(shards, tmp_path):
    """A peer frozen, not killed (a node gone without a TCP reset looks the same): the other rank
    waits in its allreduce, which Gloo bounds only by the long start-up timeout the chart sets."""
    out = tmp_path / "out"
    train = [sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
             "--preset", "seed-model1", "--batch-size", "16", "--epochs", "50", "--stall-timeout", "30"]
    log = tmp_path / "stderr"   # a file, not a pipe: a process left behind must not hold the test up
    with log.open("w") as errors:
        job = subprocess.Popen([sys.executable, "-m", "trainer.launch", "--local-pods", "2", "--port",
                                str(free_port()), "--", *train], cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors,
                               text=True, env={**os.environ, "HOROVOD_GLOO_TIMEOUT_SECONDS": "600"})
    frozen = None
    try:
        while not (out / "checkpoints" / "latest.json").exists():   # training is under way
            assert job.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        frozen = ranks_of(str(out))[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        job.wait(timeout=120)
        ended = time.monotonic() - stopped
        time.sleep(1)
        assert not alive(frozen), "the frozen rank was left behind"
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
                os.kill(frozen, signal.SIGKILL)
        job.kill()
    stderr = log.read_text()
    assert job.returncode == 7, stderr[-3000:]
    assert ended < 90, ended
    (line,) = [line for line in stderr.splitlines() if "error: rank 0: no progress for" in line]   # after tqdm's \r
    assert "(--stall-timeout 30) while waiting for epoch" in line and "its allreduce with the other ranks" in line
    assert "Traceback" not in stderr

"""Numbers a user acts on: exact top-k under ties, a diverged run never 'best', partial evaluation
recorded, seeded runs that repeat, resume that is the same run, reruns with other settings refused."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer.evaluation import top_k_hits

from .conftest import REPO, run_cli

HOROVODRUN = Path(sys.executable).parent / "horovodrun"
TIMING = {"images_per_second", "data_wait_share", "seconds"}


@pytest.fixture
def shards(train_shards):
    return train_shards


def test_ties_never_put_more_than_k_classes_in_the_top_k():
    labels = tf.constant(np.arange(20) % 10, tf.int32)
    uniform = tf.fill([20, 10], 0.1)   # a collapsed model: every class tied
    # tf.math.top_k's ranking: ties broken by the lower class index.
    assert float(top_k_hits(uniform, labels, 5)) == 10.0      # labels 0..4
    assert float(top_k_hits(uniform, labels, 1)) == 2.0       # label 0
    assert float(top_k_hits(tf.fill([20, 10], np.nan), labels, 5)) <= 10.0
    one_hot = tf.one_hot(labels, 10)
    assert float(top_k_hits(one_hot, labels, 1)) == 20.0 and float(top_k_hits(one_hot, labels, 5)) == 20.0
    # Fewer classes than k: every label is in the top k.
    assert float(top_k_hits(tf.fill([4, 3], 1 / 3), tf.constant([0, 1, 2, 2]), 5)) == 4.0


def test_a_diverging_run_stops_with_one_line_naming_the_step(shards, tmp_path):
    out = tmp_path / "out"
    result = run_cli("trainer.train", "--data", shards, "--output", out, "--preset", "seed-model1",
                     "--epochs", "3", "--batch-size", "32", "--lr", "1000")
    assert result.returncode == 6, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "training diverged: the loss was nan at epoch 0, step" in errors[0] and "--restart" in errors[0]
    assert not (out / "results.json").exists() and not (out / "model.keras").exists()


def test_a_model_blown_up_by_an_epochs_last_step_is_never_saved(shards, tmp_path):
    # One step an epoch whose update blows the weights up: its loss, computed before it, was finite;
    # the model it leaves answers NaN (and chance-level accuracy, by ties).
    out = tmp_path / "out"
    result = run_cli("trainer.train", "--data", shards, "--output", out, "--preset", "seed-model1", "--epochs", "1",
                     "--batch-size", "1000", "--optimizer", "sgd", "--lr", "1e38", "--warmup-epochs", "0")
    assert result.returncode == 6, result.stderr[-2000:]
    assert "training diverged: the model's outputs on 100 of 100 val samples are NaN or infinite at epoch 0, step 0" \
        in result.stderr
    assert not (out / "model.keras").exists() and not (out / "results.json").exists()
    assert not (out / "checkpoints").exists()


def test_a_partial_evaluation_is_recorded_and_never_called_exact(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    lost = manifest["splits"]["val"]["shards"][0]
    (data / lost["name"]).unlink()
    out = tmp_path / "out"
    result = run_cli("trainer.train", "--data", data, "--output", out, "--preset", "seed-model1",
                     "--epochs", "1", "--batch-size", "32")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    expected = manifest["splits"]["val"]["samples"]
    assert (results["val_samples_seen"], results["val_samples_expected"]) == (expected - lost["samples"], expected)
    assert results["val_exact"] is False
    assert "epoch 0: val accuracy is over 50 of the split's 100 samples" in result.stderr
    (row,) = csv.DictReader((out / "history.csv").open())
    assert (int(row["val_samples_seen"]), int(row["val_samples_expected"])) == (50, 100)


def train_command(shards, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
            "--preset", "seed-model1-aug", "--batch-size", "32", "--lr", "0.002", "--seed", "3", "--deterministic",
            *extra]


def launch(command: list[str], workers: int) -> subprocess.Popen:
    if workers > 1:
        command = [str(HOROVODRUN), "-np", str(workers), "-H", f"localhost:{workers}", "--gloo", *command]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def final_state(out: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The last checkpoint's arrays and the epoch history without its timings."""
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    with np.load(out / latest["state"]) as state:
        arrays = {key: state[key] for key in state.files}
    return arrays, [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in latest["history"]]


def assert_same_run(first: Path, second: Path, tolerance: float) -> None:
    (a, history_a), (b, history_b) = final_state(first), final_state(second)
    assert a.keys() == b.keys()
    for key in a:
        assert np.max(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)), initial=0) <= tolerance, key
    assert history_a == history_b


@pytest.mark.parametrize("workers", [1, 2])
def test_seeded_deterministic_runs_are_identical(shards, tmp_path, workers):
    for name in ("a", "b"):
        finish(launch(train_command(shards, tmp_path / name, "--epochs", "2"), workers))
    assert_same_run(tmp_path / "a", tmp_path / "b", tolerance=0.0)
    arrays, _ = final_state(tmp_path / "a")
    states = arrays["seed_states"]
    assert states.shape[0] == workers and len({tuple(s.ravel()) for s in states}) == workers   # one per rank


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_after_epoch_1_resumes_to_the_same_weights(shards, tmp_path, workers):
    finish(launch(train_command(shards, tmp_path / "whole", "--epochs", "3"), workers))
    out = tmp_path / "killed"
    command = train_command(shards, out, "--epochs", "3")
    job = launch(command, workers)
    latest = out / "checkpoints" / "latest.json"
    try:
        while not (latest.exists() and json.loads(latest.read_text())["next_epoch"] >= 2):
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    finish(launch(command, workers))
    assert json.loads((out / "results.json").read_text())["start_epoch"] == 2
    assert_same_run(tmp_path / "whole", out, tolerance=1e-6)
    whole = (tmp_path / "whole" / "history.csv").read_text().splitlines()
    resumed = (out / "history.csv").read_text().splitlines()
    assert [line.split(",")[:7] for line in whole] == [line.split(",")[:7] for line in resumed]


def test_a_finished_run_is_left_as_it_is_and_a_lost_ending_is_redone(shards, tmp_path):
    out = tmp_path / "out"
    args = ["--data", shards, "--output", out, "--preset", "seed-model1", "--batch-size", "64", "--epochs", "2"]
    run_cli("trainer.train", *args, check=True)
    written = {name: (out / name).read_bytes() for name in ("config.json", "results.json", "history.csv")}
    for rerun in (args, [*args[:-1], "1"]):   # the same command, or fewer epochs than were run
        result = run_cli("trainer.train", *rerun, check=True)
        assert "is finished (2 epochs): nothing to do" in result.stderr
        assert {name: (out / name).read_bytes() for name in written} == written
    # Killed after the last checkpoint, before the results: the rerun writes them, history included.
    for name in ("results.json", "model.keras", "history.csv", "classes.json"):
        (out / name).unlink()
    run_cli("trainer.train", *args, check=True)
    assert (out / "history.csv").read_bytes() == written["history.csv"] and (out / "model.keras").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["start_epoch"] == 2


def test_a_rerun_with_other_settings_is_refused_until_restart(shards, tmp_path):
    out = tmp_path / "out"
    args = ["--data", shards, "--output", out, "--preset", "seed-model1", "--batch-size", "64", "--epochs", "1"]
    run_cli("trainer.train", *args, check=True)
    config = (out / "config.json").read_text()
    assert json.loads(config)["model"]["dropout"] == [0.5]   # the model's own rate, stated
    refused = run_cli("trainer.train", *args, "--model", "model2", "--dropout", "0.5,0.5,0.5", "--lr", "0.01")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    for difference in ("model model1 -> model2", "dropout [0.5] -> [0.5, 0.5, 0.5]", "lr 0.001 -> 0.01"):
        assert difference in line
    assert "--restart" in line and (out / "config.json").read_text() == config
    other = tmp_path / "other"
    run_cli("ingest.synth", "--output", other / "tiny", "--classes", "10", "--train-per-class", "100",
            "--val-per-class", "10", "--seed", "5", check=True)
    run_cli("ingest.shard", "--input", other / "tiny", "--output", other / "shards", "--shard-size", "50", check=True)
    refused = run_cli("trainer.train", *args[:-1], "2", "--data", other / "shards")
    assert refused.returncode == 2 and "error: " in refused.stderr and "dataset " in refused.stderr
    # What may change on resume: more epochs, patience, the data's spelling, rates stated as the default.
    extended = run_cli("trainer.train", *args[:-1], "2", "--early-stopping-patience", "3", "--data", f"{shards}/",
                       "--dropout", "0.5")
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["start_epoch"] == 1
    restarted = run_cli("trainer.train", *args, "--model", "model2", "--restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "model2" and results["start_epoch"] == 0 and results["epochs_run"] == 1
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "model2"


def test_another_worker_count_is_refused_and_ranks_resume_from_rank_0(shards, tmp_path):
    out = tmp_path / "out"
    finish(launch(train_command(shards, out, "--epochs", "1"), 1))
    # Every rank exits with the cause's code (2), not rank 1 with 1 ("rerun to resume"): each rank's
    # code is reported by a shell around it, so that no rank is stopped early by the launcher.
    command = " ".join(train_command(shards, out, "--epochs", "2"))
    refused = launch(["sh", "-c", f'{command}; echo "rank $HOROVOD_RANK exit $?"'], 2)
    stdout, stderr = refused.communicate(timeout=600)
    assert refused.returncode == 0 and "rank 0 exit 2" in stdout and "rank 1 exit 2" in stdout, stderr[-3000:]
    errors = [line.split(":", 1)[1] for line in stderr.splitlines() if "]<stderr>:error:" in line]
    assert len(errors) == 2 and all("workers 1 -> 2" in line and "rank 0 could not" not in line for line in errors)
    assert "Traceback" not in stderr
    # Outputs on per-pod volumes: only rank 0 sees the checkpoint; rank 1 still resumes from it.
    pods = tmp_path / "pods"
    finish(launch(train_command(shards, pods / "rank0", "--epochs", "1"), 2))
    shutil.copytree(pods / "rank0", tmp_path / "reference")
    script = " ".join(train_command(shards, f"{pods}/rank$HOROVOD_RANK", "--epochs", "2"))
    finish(launch(["sh", "-c", script], 2))
    finish(launch(train_command(shards, tmp_path / "reference", "--epochs", "2"), 2))
    assert json.loads((pods / "rank0" / "results.json").read_text())["start_epoch"] == 1
    assert_same_run(tmp_path / "reference", pods / "rank0", tolerance=0.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_checkpoints_between_two_steps_and_the_rerun_ends_as_the_whole_run(shards, tmp_path, workers):
    """A preemption costs a step, not an epoch: the ranks agree on a step, checkpoint there, exit 143;
    the rerun continues at that step with the same data."""
    from bench.servers import free_port

    def start(out: Path) -> subprocess.Popen:
        command = train_command(shards, out, "--epochs", "2", "--batch-size", "8")
        if workers > 1:   # the project's launcher passes SIGTERM on to its processes, as in a pod
            command = [sys.executable, "-m", "trainer.launch", "--local-pods", str(workers), "--port",
                       str(free_port()), "--", *command]
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    whole = start(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    out = tmp_path / "stopped"
    job = start(out)
    latest = out / "checkpoints" / "latest.json"
    try:
        while not latest.exists():   # epoch 0 done: epoch 1 (125 steps of 8) is under way
            assert job.poll() is None, job.stderr.read()[-3000:]
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 143, stderr[-3000:]
    assert "terminated (SIGTERM): the last checkpoint is kept" in stderr and "Traceback" not in stderr
    stopped = json.loads(latest.read_text())
    assert stopped["next_epoch"] == 1 and 0 < stopped["partial"]["step"] < 125, stopped["partial"]
    assert "-step-" in stopped["state"]
    rerun = start(out)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-3000:]
    assert_same_run(tmp_path / "whole", out, tolerance=1e-6)


def test_checkpoint_every_checkpoints_mid_epoch_and_a_run_killed_after_one_resumes_there(shards, tmp_path):
    finish(launch(train_command(shards, tmp_path / "whole", "--epochs", "2", "--batch-size", "8"), 1))
    out = tmp_path / "killed"
    command = train_command(shards, out, "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "0.005")
    job = launch(command, 1)
    latest = out / "checkpoints" / "latest.json"
    # Killed (no chance to checkpoint) once a time-based checkpoint in the first 100 of epoch 1's 125 steps is
    # committed: a later one before the kill lands (a loaded machine) is still mid-epoch.
    try:
        while not (latest.exists() and 0 < (json.loads(latest.read_text()).get("partial") or {}).get("step", 0) <= 100
                   and json.loads(latest.read_text())["next_epoch"] == 1):
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    step = (json.loads(latest.read_text())["partial"] or {}).get("step")
    finish(launch(command, 1))
    assert_same_run(tmp_path / "whole", out, tolerance=1e-6)
    assert 0 < step < 125

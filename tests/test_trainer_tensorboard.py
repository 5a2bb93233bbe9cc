"""Each run shows itself: its TensorBoard event files, read back with TensorBoard's own reader, hold
history.csv's values per epoch and the loss and rate of every --log-every-steps step, exactly once across
stops, kills and reruns, also on S3; its curves.png is a drawn figure, drawn again after each epoch."""
from __future__ import annotations

import csv
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, run_cli

TRAIN_SAMPLES = 1000   # the train_shards fixture's
STEP_TAGS = ("batch_loss", "batch_learning_rate")
EPOCH_TAGS = {"train": {"epoch_loss": "loss", "epoch_top1": "train_top1", "epoch_top5": "train_top5",
                        "epoch_learning_rate": "learning_rate", "epoch_images_per_second": "images_per_second",
                        "epoch_data_wait_share": "data_wait_share"},
              "validation": {"epoch_top1": "val_top1", "epoch_top5": "val_top5"}}
CURVES_SIZE = (1300, 450)


def train_args(shards: Path, output, *flags: str) -> list[str]:
    return ["--data", str(shards), "--output", str(output), "--preset", "seed-model1", "--log-level", "WARNING",
            *flags]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in the order TensorBoard's loader reads them (every file of the directory,
    duplicates kept); every tag a scalar of TensorBoard's scalar plugin."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    accumulator = EventAccumulator(str(run), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    assert all(accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars" for tag in tags)
    return {tag: [(event.step, float(make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
            for tag in tags}


def history(output: Path) -> list[dict]:
    return [{key: float(value) for key, value in row.items()}
            for row in csv.DictReader(io.StringIO((output / "history.csv").read_text()))]


def assert_epochs_are_history(output: Path) -> None:
    """Every epoch once, at step = epoch, with history.csv's value (as float32, TensorBoard's scalars)."""
    rows = history(output)
    for run, tags in EPOCH_TAGS.items():
        found = scalars(output / "tensorboard" / run)
        for tag, column in tags.items():
            assert found[tag] == [(int(row["epoch"]), float(np.float32(row[column]))) for row in rows], (run, tag)


def assert_curves_drawn(png: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == CURVES_SIZE
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    # White, text, grid, two curves' colours and their antialiased shades: a drawn figure, not a blank one.
    assert len(colours) > 20


def test_a_run_logs_its_epochs_and_every_nth_step_and_draws_its_curves(train_shards, tmp_path):
    out = tmp_path / "run"
    # Cosine from the first step: every logged rate differs, and is checked against the schedule.
    run_cli("trainer.train", *train_args(train_shards, out, "--epochs", "2", "--batch-size", "32",
                                         "--log-every-steps", "7", "--warmup-epochs", "0", "--lr-schedule", "cosine"),
            check=True)
    assert_epochs_are_history(out)
    steps_per_epoch = TRAIN_SAMPLES // 32   # one rank: every epoch has its nominal steps
    train = scalars(out / "tensorboard" / "train")
    logged = list(range(0, 2 * steps_per_epoch, 7))
    for tag in STEP_TAGS:
        assert [step for step, _ in train[tag]] == logged, tag
    total = 2 * steps_per_epoch
    for step, rate in train["batch_learning_rate"]:   # the rate the step used: its iteration's
        assert rate == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-5)
    losses = dict(train["batch_loss"])
    assert losses[0] == pytest.approx(math.log(10), abs=0.3)   # 10 classes, untrained
    assert all(0 < loss < 10 for loss in losses.values())
    assert set(scalars(out / "tensorboard" / "validation")) == set(EPOCH_TAGS["validation"])
    assert_curves_drawn((out / "curves.png").read_bytes())


def tensorboard_steps(event_file: Path) -> list[int]:
    """The batch_loss steps of one event file, read as a kill may leave it (its last record cut short)."""
    from trainer.tensorboard import _events

    return [event.step for _, event in _events(event_file.read_bytes())
            if [value.tag for value in event.summary.value] == ["batch_loss"]]


def test_stopped_killed_and_rerun_every_event_is_there_once(train_shards, tmp_path):
    """SIGTERM mid-epoch 1 (a checkpoint at a step boundary), then SIGKILL mid-epoch 2 after the step log
    reached the file, then a rerun to the end: each attempt's files together hold every epoch and every
    step once (the killed attempt's events after its checkpoint removed), and curves.png was drawn again."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainer.train",
               *train_args(train_shards, out, "--epochs", "3", "--batch-size", "8", "--log-every-steps", "1")]
    steps_per_epoch = TRAIN_SAMPLES // 8
    latest = out / "checkpoints" / "latest.json"

    def attempt_until(ready, sig: int) -> None:
        job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while not ready():
                assert job.poll() is None, job.stderr.read()[-3000:]
                time.sleep(0.02)
            job.send_signal(sig)
            job.communicate(timeout=120)
        finally:
            job.kill()

    def at_epoch(epoch: int) -> bool:
        return latest.exists() and json.loads(latest.read_text())["next_epoch"] == epoch

    attempt_until(lambda: at_epoch(1), signal.SIGTERM)
    stopped = json.loads(latest.read_text())
    assert stopped["next_epoch"] == 1 and stopped["partial"], stopped   # stopped mid-epoch
    curves_after_epoch_0 = (out / "curves.png").read_bytes()
    assert_curves_drawn(curves_after_epoch_0)

    files = out / "tensorboard" / "train"
    (first,) = files.iterdir()

    def second_file() -> Path | None:
        return next((path for path in files.iterdir() if path != first), None)

    def into_epoch_2() -> bool:   # and the step log of epoch 2 in the second attempt's file
        second = second_file()
        return at_epoch(2) and second is not None and max(tensorboard_steps(second), default=0) > 2 * steps_per_epoch + 4

    attempt_until(into_epoch_2, signal.SIGKILL)
    resume = json.loads(latest.read_text())
    resume_step = resume["next_epoch"] * steps_per_epoch + (resume["partial"] or {}).get("step", 0)
    assert max(tensorboard_steps(second_file())) >= resume_step   # events the rerun must remove, or they would double

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(list(files.iterdir())) == 3   # one file per attempt
    assert_epochs_are_history(out)
    train = scalars(files)
    for tag in STEP_TAGS:
        assert [step for step, _ in train[tag]] == list(range(3 * steps_per_epoch)), tag
    final = (out / "curves.png").read_bytes()
    assert_curves_drawn(final)
    assert final != curves_after_epoch_0


def test_on_s3_the_files_are_uploaded_extended_filled_in_and_replaced_by_a_restart(train_shards, s3_bucket, tmp_path):
    import fsspec

    fs, url = fsspec.filesystem("s3"), f"s3://{s3_bucket}/run"

    def train(*flags: str) -> Path:
        run_cli("trainer.train", *train_args(train_shards, url, "--batch-size", "32", *flags), check=True)
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        fs.get(f"{s3_bucket}/run", str(copy), recursive=True)
        assert_epochs_are_history(copy)
        assert_curves_drawn((copy / "curves.png").read_bytes())
        return copy

    first = train("--epochs", "1", "--log-every-steps", "10")
    assert [step for step, _ in scalars(first / "tensorboard" / "train")["batch_loss"]] == [0, 10, 20, 30]

    # Extended by an epoch, its event files gone meanwhile (as a run from before they existed): the rerun
    # writes epoch 0 from the checkpoint's history; the step log of epoch 0 is lost with its files.
    fs.rm(f"{s3_bucket}/run/tensorboard", recursive=True)
    extended = train("--epochs", "2", "--log-every-steps", "10")
    assert [step for step, _ in scalars(extended / "tensorboard" / "train")["batch_loss"]] == [40, 50, 60]

    # Started over with the step log off: the earlier events are gone, the new run's epochs there once.
    again = train("--epochs", "1", "--log-every-steps", "0", "--restart")
    assert not set(STEP_TAGS) & set(scalars(again / "tensorboard" / "train"))
    assert [len(list((again / "tensorboard" / run).iterdir())) for run in EPOCH_TAGS] == [1, 1]


def test_a_negative_step_interval_is_a_flag_error(tmp_path):
    result = run_cli("trainer.train", "--data", tmp_path, "--output", tmp_path / "out", "--log-every-steps", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("log every steps -1 must be >= 0 (0: never)")

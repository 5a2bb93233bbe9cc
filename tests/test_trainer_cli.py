"""The trainer's command line as a user meets it: fast help, one-line errors with the flag-error
code for flags that do not fit, no TensorFlow start-up noise."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli

NOISE = ("I0000", "W0000", "E0000", "absl::InitializeLog", "oneDNN", "cpu_feature_guard")


@pytest.fixture
def shards(train_shards):
    return train_shards


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("module", ["trainer.train", "trainer.evaluate", "trainer.predict"])
def test_help_does_not_load_tensorflow(module):
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{module}', '--help']\n"
             "try:\n"
             f"    runpy.run_module('{module}', run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    print('exit', exit.code, 'tensorflow' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--help" in result.stdout and result.stderr.strip().splitlines()[-1] == "exit 0 False", result.stderr


@pytest.mark.parametrize(("flags", "expected"), [
    (["--preset", "seed-model1", "--dropout", "0.1,0.2"], "--dropout 0.1,0.2: model1 takes 1 dropout rate(s), got 2"),
    (["--model", "resnet18", "--dropout", "0.5"], "--dropout: model resnet18 has no dropout layers"),
    (["--preset", "seed-model1", "--image-size", "16"], "--image-size 16 does not fit --model model1: its layers"),
    (["--metrics-port", "70000"], "metrics port 70000 must be in 1..65535"),
    (["--lr", "inf"], "learning rate inf must be a finite number > 0"),
])
def test_a_flag_that_does_not_fit_is_a_flag_error(shards, tmp_path, flags, expected):
    result = run_cli("trainer.train", "--data", shards, "--output", tmp_path / "out", "--epochs", "1", *flags)
    assert result.returncode == 2 and expected in one_error_line(result)
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_metrics_port_in_use_is_a_flag_error(shards, tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("trainer.train", "--data", shards, "--output", tmp_path / "out", "--epochs", "1",
                         "--metrics-port", port)
    assert result.returncode == 2
    assert f"--metrics-port: rank 0 cannot serve metrics on port {port}" in one_error_line(result)


def test_a_normal_run_logs_no_tensorflow_start_up_lines(shards, tmp_path):
    result = run_cli("trainer.train", "--data", shards, "--output", tmp_path / "out", "--preset", "seed-model1",
                     "--epochs", "1", "--batch-size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    noisy = [line for line in result.stderr.splitlines() if any(noise in line for noise in NOISE)]
    assert noisy == []


def test_storage_options_reach_the_data_the_checkpoints_and_the_model(shards, s3_bucket, s3_endpoint):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(f"s3://{s3_bucket}")
    fs.put(str(shards), f"{s3_bucket}/data", recursive=True)
    # The environment points at nothing: only --storage-option can reach the bucket.
    nowhere = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    args = ["--data", f"s3://{s3_bucket}/data", "--output", f"s3://{s3_bucket}/run", "--preset", "seed-model1",
            "--epochs", "1", "--batch-size", "64", "--storage-option", f"endpoint_url={s3_endpoint}"]
    result = run_cli("trainer.train", *args, env=nowhere)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "history.csv", "checkpoints/latest.json", "model.keras", "results.json"):
        assert fs.isfile(f"{s3_bucket}/run/{name}"), name
    evaluated = run_cli("trainer.evaluate", "--model", f"s3://{s3_bucket}/run", "--data", f"s3://{s3_bucket}/data",
                        "--storage-option", f"endpoint_url={s3_endpoint}", env=nowhere)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

"""The trainer as a real 2-process Horovod job (horovodrun --gloo on 127.0.0.1)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.servers import S3_TEST_ENV

from .conftest import REPO, run_cli

HOROVODRUN = Path(sys.executable).parent / "horovodrun"


@pytest.fixture
def shards(train_shards):
    return train_shards


def horovodrun(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", *command], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def rank_lines(stdout: str) -> list[dict]:
    """The JSON lines the ranks printed (horovodrun prefixes them with [rank]<stdout>:)."""
    return [json.loads(line.split(":", 1)[1]) for line in stdout.splitlines()
            if "<stdout>:{" in line]


def test_two_workers_keep_identical_weights_and_exact_eval(shards, tmp_path):
    result = horovodrun(sys.executable, "tests/distributed/check_training.py", str(shards), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(rank_lines(result.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["size"] == 2
    first, second = ranks[0]["checksums"]
    assert first == pytest.approx(second, rel=1e-6)
    assert ranks[0]["distributed_eval"] == ranks[1]["distributed_eval"]
    assert ranks[0]["distributed_eval"] == pytest.approx(ranks[0]["alone_eval"], abs=1e-6)
    assert ranks[0]["dropout_outputs_differ"] and ranks[1]["dropout_outputs_differ"]


def test_train_cli_writes_config_model_and_results(shards, tmp_path):
    out = tmp_path / "out"
    result = horovodrun(sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
                        "--preset", "seed-model1-aug", "--epochs", "6", "--batch-size", "16", "--lr", "0.002")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["workers"] == 2 and results["epochs_run"] == 6 and results["model"] == "model1"
    # 10 classes: chance is 0.1 top-1 and 0.5 top-5; the synthetic set is learnable.
    assert results["val_top1"] > 0.3 and results["val_top5"] > 0.8
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["dropout"] == [0.5] and config["augment"]["enabled"] is True and config["lr"] == 0.002
    assert (out / "model.keras").stat().st_size > 0

    # The saved model alone gives the val accuracy the distributed run reported for its best epoch.
    evaluated = json.loads(run_cli("trainer.evaluate", "--model", out, "--data", shards, check=True).stdout)
    assert evaluated["top1"] == pytest.approx(results["val_top1"], abs=1e-6)
    assert evaluated["top5"] == pytest.approx(results["val_top5"], abs=1e-6)

    image = next((shards.parent / "tiny" / "val" / "images").iterdir())
    (tmp_path / "notes.txt").write_text("not an image")
    predicted = run_cli("trainer.predict", "--model", out, image, tmp_path / "notes.txt")
    assert predicted.returncode == 3 and "notes.txt: not a readable image" in predicted.stderr
    lines = predicted.stdout.splitlines()
    names = {c["name"] for c in json.loads((out / "classes.json").read_text())}
    assert lines[0] == str(image) and len(lines) == 6
    probabilities = [float(line.split()[0]) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert all(line.split(None, 1)[1] in names for line in lines[1:])


def test_rerun_resumes_from_the_last_checkpoint(shards, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(out),
               "--preset", "seed-model1-aug", "--batch-size", "32", "--lr", "0.002"]
    assert horovodrun(*command, "--epochs", "2").returncode == 0
    first = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert first["next_epoch"] == 2 and [h["epoch"] for h in first["history"]] == [0, 1]
    # A half-written state file from a crash must not be picked up.
    (out / "checkpoints" / "epoch-0002.npz").write_bytes(b"partial")
    result = horovodrun(*command, "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["start_epoch"] == 2 and results["epochs_run"] == 3
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert [h["epoch"] for h in latest["history"]] == [0, 1, 2]
    # The schedule continued: the optimizer's step count went on from 2 epochs' worth.
    import numpy as np
    with np.load(out / latest["state"]) as state:
        assert int(state["optimizer_0"]) == 3 * (1000 // (32 * 2))
    written = (out / "results.json").read_bytes()
    done = horovodrun(*command, "--epochs", "3")   # finished: nothing more, nothing rewritten
    assert done.returncode == 0 and "is finished (3 epochs): nothing to do" in done.stderr
    assert (out / "results.json").read_bytes() == written


def test_early_stopping_ends_the_run_and_keeps_the_best_epoch(shards, tmp_path):
    out = tmp_path / "out"
    # A learning rate too small to change anything: val accuracy cannot improve after epoch 0.
    args = ["--data", shards, "--output", out, "--preset", "seed-model1", "--batch-size", "64", "--lr", "1e-12",
            "--epochs", "10", "--early-stopping-patience", "2"]
    result = run_cli("trainer.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 3 and results["best_epoch"] == 0 and results["workers"] == 1
    again = run_cli("trainer.train", *args)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["epochs_run"] == 3
    # More patience on a rerun: the run goes on until it runs out again (epoch 4: 4 without a better one).
    patient = run_cli("trainer.train", *args[:-1], "4")
    assert patient.returncode == 0, patient.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["epochs_run"], results["start_epoch"], results["stopped_early"]) == (5, 3, True)


def test_two_workers_take_the_steps_of_one_worker_with_their_joint_batch(shards, tmp_path):
    import numpy as np

    alone = subprocess.run([sys.executable, "tests/distributed/check_equivalence.py", str(shards),
                            str(tmp_path / "one.npz")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    pair = horovodrun(sys.executable, "tests/distributed/check_equivalence.py", str(shards), str(tmp_path / "two.npz"))
    assert pair.returncode == 0, pair.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert one.files == two.files
        for key in one.files:   # float32 sums in another order: equal to rounding
            assert np.allclose(one[key], two[key], rtol=1e-5, atol=1e-6), key


def test_one_and_two_workers_with_the_same_global_batch_both_learn(shards, tmp_path):
    # Same global batch (32) and the same effective learning rate (Adam scales the per-worker flag by sqrt(2)).
    common = ["--data", shards, "--preset", "seed-model1-aug", "--epochs", "6", "--seed", "1", "--deterministic"]
    alone = run_cli("trainer.train", *common, "--output", tmp_path / "one", "--batch-size", "32", "--lr", "0.002")
    assert alone.returncode == 0, alone.stderr[-3000:]
    pair = horovodrun(sys.executable, "-m", "trainer.train", *map(str, common), "--output", str(tmp_path / "two"),
                      "--batch-size", "16", "--lr", str(0.002 / 2 ** 0.5))
    assert pair.returncode == 0, pair.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["workers"], two["workers"]) == (1, 2)
    # Not the same run (each rank shuffles and augments its own share): that equivalence is checked
    # step by step above. Both learn the 10 classes (chance: 0.1 top-1).
    assert one["val_top1"] > 0.3 and two["val_top1"] > 0.3


def test_mixed_precision_trains_and_saves_a_float32_output(shards, tmp_path):
    out = tmp_path / "out"
    result = run_cli("trainer.train", "--data", shards, "--output", out, "--preset", "seed-model1-aug",
                     "--epochs", "5", "--batch-size", "32", "--lr", "0.002", "--mixed-precision")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["mixed_precision"] is True
    # 10 classes, chance 0.1: learning in bfloat16 still clearly happens.
    assert json.loads((out / "results.json").read_text())["val_top1"] > 0.25
    evaluated = json.loads(run_cli("trainer.evaluate", "--model", out, "--data", shards, check=True).stdout)
    assert evaluated["samples"] == 100
    # The saved model's network computes in bfloat16 and still answers in float32 (as the loss needed in training).
    probe = (f"import keras, numpy; m = keras.models.load_model({str(out / 'model.keras')!r}, compile=False); "
             "print(m.get_layer('model1').layers[0].compute_dtype, m(numpy.zeros((1, 64, 64, 3), 'uint8')).dtype.name)")
    dtypes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert dtypes.stdout.split() == ["bfloat16", "float32"]


def test_a_dataset_that_is_not_there_is_a_clean_error(tmp_path):
    result = run_cli("trainer.train", "--data", tmp_path / "nothing", "--output", tmp_path / "out")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'nothing'}/manifest.json: missing" in result.stderr


def test_restore_brings_back_the_exact_model_and_optimizer_state(shards, tmp_path):
    import numpy as np

    from ingest.storage import Location
    from trainer import checkpoint, dist, randomness
    from trainer.config import from_preset
    from trainer.loop import Trainer

    workers = dist.init()   # one process: Horovod of size 1
    config = from_preset("seed-model2-aug", str(shards), str(tmp_path / "out"), batch_size=32, epochs=2)
    first = Trainer(config, workers)
    first.start_stream()
    progress = checkpoint.Progress()
    assert progress.record(first.run_epoch(0))
    progress.best_weights = first.model.get_weights()
    fs, root = Location(config.output).open()
    checkpoint.save(fs, root, first, progress, randomness.get_states(first.model)[None])

    second = Trainer(config, workers)
    restored = checkpoint.restore(fs, root, second)
    assert restored.next_epoch == 1 and restored.best_epoch == 0
    for a, b in zip(first.model.variables, second.model.variables, strict=True):   # random state too
        assert np.array_equal(np.asarray(a.value), np.asarray(b.value)), a.path
    for a, b in zip(first.optimizer.variables, second.optimizer.variables, strict=True):
        assert np.array_equal(np.asarray(a.value), np.asarray(b.value)), a.path
    assert int(second.optimizer.iterations) == first.data.steps_in_epoch(0, 1)


def test_the_seed_model2_learns_the_synthetic_set(shards, tmp_path):
    result = run_cli("trainer.train", "--data", shards, "--output", tmp_path / "out", "--preset", "seed-model2",
                     "--epochs", "6", "--batch-size", "16", "--lr", "0.002")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # 10 classes: chance top-5 is 0.5. Heavy dropout (.75) makes model2 slower than model1.
    assert results["val_top5"] > 0.8


def test_outputs_and_resume_through_s3(shards, s3_bucket):
    import fsspec

    url = f"s3://{s3_bucket}/run"
    args = ["--data", shards, "--output", url, "--preset", "seed-model1-aug", "--batch-size", "64"]
    assert run_cli("trainer.train", *args, "--epochs", "1").returncode == 0
    resumed = run_cli("trainer.train", *args, "--epochs", "2", "--log-level", "DEBUG")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fs, root = fsspec.core.url_to_fs(url)
    # The credentials came from the environment; they are never logged nor written anywhere.
    written = [fs.cat_file(path).decode() for path in fs.find(root) if path.endswith(".json")]
    assert len(written) == 4   # config, results, classes, checkpoints/latest
    for text in (resumed.stdout, resumed.stderr, *written):
        assert S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in text
    results = json.loads(fs.cat_file(f"{root}/results.json"))
    assert results["start_epoch"] == 1 and results["epochs_run"] == 2
    assert fs.isfile(f"{root}/model.keras") and fs.isfile(f"{root}/checkpoints/latest.json")
    evaluated = json.loads(run_cli("trainer.evaluate", "--model", url, "--data", shards, check=True).stdout)
    assert evaluated["top1"] == pytest.approx(results["val_top1"], abs=1e-6)

"""`trainer.evaluate` and `trainer.predict` on finished runs: the run's own preprocessing (its
config.json), the trainer's own exact evaluation, classes checked against the dataset, one-line
errors with documented exit codes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli

TRAIN = ["--preset", "seed-model1-aug", "--epochs", "1", "--batch-size", "32"]


def train_run(shards, out, *extra: str):
    run_cli("trainer.train", "--data", shards, "--output", out, *TRAIN, *extra, check=True)
    return out


@pytest.fixture(scope="module")
def run64(train_shards, tmp_path_factory):
    return train_run(train_shards, tmp_path_factory.mktemp("eval") / "run64")


@pytest.fixture(scope="module")
def run96(train_shards, tmp_path_factory):
    """Above 64 px the size's default augmentation (ImageNet's, central crop 0.875) is not the run's."""
    return train_run(train_shards, tmp_path_factory.mktemp("eval") / "run96", "--image-size", "96")


def evaluate(run, data, *extra: str):
    return run_cli("trainer.evaluate", "--model", run, "--data", data, *extra)


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("name", ["run64", "run96"])
def test_evaluate_gives_exactly_the_val_accuracy_the_run_reported(name, train_shards, request):
    run = request.getfixturevalue(name)
    results = json.loads((run / "results.json").read_text())
    result = evaluate(run, train_shards)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout)
    assert evaluated["split"] == "val"
    assert evaluated["top1"] == pytest.approx(results["val_top1"], abs=1e-6)
    assert evaluated["top5"] == pytest.approx(results["val_top5"], abs=1e-6)
    assert evaluated["samples"] == evaluated["samples_expected"] == 100 and evaluated["exact"] is True


def test_a_partial_evaluation_says_so(run64, train_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_shards, data)
    lost = json.loads((data / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    (data / lost["name"]).unlink()
    result = evaluate(run64, data)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout)
    assert (evaluated["samples"], evaluated["samples_expected"]) == (100 - lost["samples"], 100)
    assert evaluated["exact"] is False
    assert f"over {100 - lost['samples']} of the val split's 100 samples" in result.stderr


def test_a_split_none_of_which_can_be_read_is_an_error_not_zero(run64, train_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_shards, data)
    for shard in json.loads((data / "manifest.json").read_text())["splits"]["val"]["shards"]:
        (data / shard["name"]).unlink()
    assert "none of the val split's 100 samples" in one_line_error(evaluate(run64, data), 3)


def test_a_dataset_with_other_classes_is_refused(run64, tmp_path):
    from ingest import synth

    synth.generate(str(tmp_path / "tiny"), classes=12, train_per_class=2, val_per_class=2, seed=2)
    run_cli("ingest.shard", "--input", tmp_path / "tiny", "--output", tmp_path / "shards", "--processes", "1",
            check=True)
    error = one_line_error(evaluate(run64, tmp_path / "shards"), 3)
    assert "10 classes" in error and "12" in error and "classes.json" in error


def test_a_run_whose_classes_differ_from_the_dataset_is_refused(run64, train_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run64, run)
    classes = json.loads((run / "classes.json").read_text())
    ours, theirs = classes[3]["wnid"], classes[4]["wnid"]
    classes[3]["wnid"], classes[4]["wnid"] = theirs, ours
    (run / "classes.json").write_text(json.dumps(classes))
    error = one_line_error(evaluate(run, train_shards), 3)
    assert f"class 3 is {theirs}" in error and ours in error


@pytest.mark.parametrize("model", ["nothing", "nosuch://bucket/run"])
def test_a_missing_model_is_one_line(model, train_shards, tmp_path):
    url = str(tmp_path / model) if "://" not in model else model
    error = one_line_error(evaluate(url, train_shards), 3)
    assert url in error
    assert url in one_line_error(run_cli("trainer.predict", "--model", url, tmp_path / "any.jpg"), 3)


def test_a_missing_model_in_a_bucket_is_one_line(s3_bucket, train_shards):
    url = f"s3://{s3_bucket}/nothing"
    assert url in one_line_error(evaluate(url, train_shards), 3)


def test_a_run_without_its_config_is_one_line(run64, train_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run64, run)
    (run / "config.json").unlink()
    assert "config.json" in one_line_error(evaluate(run, train_shards), 3)
    assert "config.json" in one_line_error(run_cli("trainer.predict", "--model", run, tmp_path / "any.jpg"), 3)


@pytest.mark.parametrize("data", ["nothing", "nosuch://bucket/data"])
def test_a_missing_dataset_is_one_line(data, run64, tmp_path):
    url = str(tmp_path / data) if "://" not in data else data
    assert url in one_line_error(evaluate(run64, url), 3)


def test_splits_the_dataset_lacks_or_without_labels_are_refused(run64, train_shards, tmp_path):
    error = one_line_error(evaluate(run64, train_shards, "--split", "bogus"), 2)
    assert "'bogus'" in error and "train, val" in error
    data = tmp_path / "data"   # as if val were a test split (ingest.shard --splits ...,test: no labels)
    shutil.copytree(train_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["labelled"] = False
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert "no labels" in one_line_error(evaluate(run64, data), 2)


def test_a_batch_size_below_one_is_a_usage_error(run64, train_shards):
    result = evaluate(run64, train_shards, "--batch-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--batch-size" in result.stderr


def test_evaluate_and_predict_from_a_bucket(run96, train_shards, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(run96), f"{s3_bucket}/run", recursive=True)
    fs.put(str(train_shards), f"{s3_bucket}/data", recursive=True)
    results = json.loads((run96 / "results.json").read_text())
    result = evaluate(f"s3://{s3_bucket}/run", f"s3://{s3_bucket}/data")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["top1"] == pytest.approx(results["val_top1"], abs=1e-6)


def test_predict_preprocesses_as_the_run_did(run96, train_shards, tmp_path):
    import keras
    import numpy as np

    from ingest.images import normalize
    from trainer.augment import eval_image
    from trainer.config import TrainConfig

    image = next((train_shards.parent / "tiny" / "val" / "images").iterdir())
    (tmp_path / "notes.txt").write_text("not an image")
    predicted = run_cli("trainer.predict", "--model", run96, image, tmp_path / "notes.txt")
    assert predicted.returncode == 3 and "Traceback" not in predicted.stderr
    assert "notes.txt: not a readable image" in predicted.stderr
    lines = predicted.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    shown = [(line.split(None, 1)[1], float(line.split()[0])) for line in lines[1:]]
    # What the run's own validation would compute for this image as the dataset stores it.
    config = TrainConfig.from_json(json.loads((run96 / "config.json").read_text()))
    classes = json.loads((run96 / "classes.json").read_text())
    model = keras.models.load_model(run96 / "model.keras", compile=False)
    jpeg = normalize(image.read_bytes()).data
    probabilities = np.asarray(model(eval_image(jpeg, config.image_size, config.augment)[None]))[0]
    best = np.argsort(-probabilities, kind="stable")[:5]
    assert [name for name, _ in shown] == [classes[i]["name"] for i in best]
    assert [p for _, p in shown] == pytest.approx([float(probabilities[i]) for i in best], abs=1e-4)


@pytest.mark.parametrize("module", ["trainer.evaluate", "trainer.predict"])
def test_help_does_not_load_tensorflow(module):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "tensorflow" not in imported and "keras" not in imported

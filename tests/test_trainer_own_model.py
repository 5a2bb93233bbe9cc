"""Your own model: `--model package.module:function` and `--model keras.applications.NAME` through the
CLI (a user's module on PYTHONPATH, one short epoch), one-line errors for what cannot be built, and the
saved model: model.keras and saved_model/ take uint8 images and answer probabilities in a process that
imports no project code, as trainer.predict does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from .conftest import run_cli

USER_MODULE = '''
import keras
from keras import layers


def tiny(num_classes, image_size, dropout=(0.25,)):
    """A small CNN: what a user's own function looks like."""
    return keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, activation="relu"), layers.GlobalAveragePooling2D(),
        layers.Dropout(dropout[0]), layers.Dense(num_classes, activation="softmax"),
    ], name="tiny")


def raises(num_classes, image_size):
    raise RuntimeError("no GPU, no model")


def not_a_model(num_classes, image_size):
    return [num_classes, image_size]


def logits(num_classes, image_size):
    """No softmax at the end: scores, not probabilities."""
    return keras.Sequential([keras.Input((image_size, image_size, 3)), layers.GlobalAveragePooling2D(),
                             layers.Dense(num_classes)])
'''
# A model with a layer of its own: its module must be imported (registering the layer) to load it.
FANCY_MODULE = '''
import keras
from keras import layers


@keras.saving.register_keras_serializable(package="fancy")
class Halve(layers.Layer):
    def call(self, inputs):
        return inputs * 0.5


def net(num_classes, image_size):
    return keras.Sequential([keras.Input((image_size, image_size, 3)), Halve(), layers.Conv2D(8, 3, activation="relu"),
                             layers.GlobalAveragePooling2D(), layers.Dense(num_classes, activation="softmax")])
'''
TRAIN = ["--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def user_path(tmp_path_factory):
    """A folder with the user's module (and one that fails on import), for PYTHONPATH."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(USER_MODULE)
    (folder / "broken.py").write_text("import no_such_dependency_here\n")
    (folder / "fancy.py").write_text(FANCY_MODULE)
    return folder


def train(shards, out, model: str, *extra: str, env: dict | None = None):
    return run_cli("trainer.train", "--data", shards, "--output", out, "--model", model, *TRAIN, *extra, env=env)


@pytest.fixture(scope="module")
def user_run(train_shards, user_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "run"
    result = train(train_shards, out, "mymodels:tiny", env={"PYTHONPATH": str(user_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def application_run(train_shards, tmp_path_factory):
    """A Keras application that scales its input itself (MobileNetV3: Rescaling first), at 32 px."""
    out = tmp_path_factory.mktemp("own") / "app"
    result = train(train_shards, out, "keras.applications.MobileNetV3Small", "--image-size", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_users_function_trains_and_its_spec_is_kept(user_run, user_path, train_shards):
    config = json.loads((user_run / "config.json").read_text())
    assert config["model"] == {"name": "mymodels:tiny", "dropout": [0.25]}   # its own default rate, stated
    results = json.loads((user_run / "results.json").read_text())
    assert results["model"] == "mymodels:tiny" and results["dropout"] == [0.25]
    # The same command again: a rerun of the finished run, which rebuilds the model from the spec.
    again = train(train_shards, user_run, "mymodels:tiny", env={"PYTHONPATH": str(user_path)})
    assert again.returncode == 0 and "is finished" in again.stderr, again.stderr[-3000:]
    # Another model is another run: refused, naming the change.
    other = train(train_shards, user_run, "model1")
    assert other.returncode == 2 and "model mymodels:tiny -> model1" in other.stderr
    # Evaluated without the user's module: the saved model needs none of its code.
    evaluated = run_cli("trainer.evaluate", "--model", user_run, "--data", train_shards)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(results["val_top1"], abs=1e-6)


def test_a_keras_application_trains(application_run, train_shards):
    config = json.loads((application_run / "config.json").read_text())
    assert config["model"]["name"] == "keras.applications.MobileNetV3Small" and config["image_size"] == 32
    results = json.loads((application_run / "results.json").read_text())
    evaluated = run_cli("trainer.evaluate", "--model", application_run, "--data", train_shards)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["top5"] == pytest.approx(results["val_top5"], abs=1e-6)


# Run in a fresh interpreter that cannot import project code: model.keras through Keras, saved_model/
# through TensorFlow alone, on the uint8 images given as a .npy file.
STANDALONE = textwrap.dedent('''
    import json, sys

    class NoProjectCode:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"trainer", "ingest", "bench", "mymodels"}:
                raise ImportError(f"{name}: project code")

    sys.meta_path.insert(0, NoProjectCode())
    import keras, numpy as np, tensorflow as tf

    model_path, saved_model_path, images_path = sys.argv[1:]
    images = np.load(images_path)
    probabilities = np.asarray(keras.models.load_model(model_path)(images))
    serving = tf.saved_model.load(saved_model_path).signatures["serving_default"]
    (inputs,) = serving.structured_input_signature[1].items()
    served = serving(images=tf.constant(images))
    print(json.dumps({
        "keras": probabilities.tolist(), "served": served["probabilities"].numpy().tolist(),
        "input": [inputs[0], inputs[1].dtype.name, inputs[1].shape.as_list()],
        "outputs": {name: [spec.dtype.name, spec.shape.as_list()] for name, spec in serving.structured_outputs.items()},
        "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in {"trainer", "ingest", "mymodels"}),
    }))
''')


@pytest.mark.parametrize("name", ["user_run", "application_run"])
def test_the_saved_model_needs_no_project_code_and_answers_as_predict_does(name, train_shards, request, tmp_path):
    import tensorflow as tf

    from ingest.images import normalize
    from trainer.augment import eval_image
    from trainer.config import TrainConfig

    run = request.getfixturevalue(name)
    config = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    files = sorted((train_shards.parent / "tiny" / "val" / "images").iterdir())[:3]
    # The images as the run's validation saw them: uint8, the training size (trainer.predict's own steps).
    images = np.stack([eval_image(tf.constant(normalize(f.read_bytes()).data), config.image_size,
                                  config.augment).numpy() for f in files])
    assert images.dtype == np.uint8 and images.shape == (3, config.image_size, config.image_size, 3)
    np.save(tmp_path / "images.npy", images)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    standalone = subprocess.run([sys.executable, "-c", STANDALONE, str(run / "model.keras"), str(run / "saved_model"),
                                 str(tmp_path / "images.npy")], cwd=tmp_path, env=environment, capture_output=True,
                                text=True, timeout=300)
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    answer = json.loads(standalone.stdout)
    assert answer["project_modules"] == []
    assert answer["input"] == ["images", "uint8", [None, config.image_size, config.image_size, 3]]
    assert answer["outputs"] == {"probabilities": ["float32", [None, 10]]}
    probabilities = np.array(answer["keras"])
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(answer["served"], probabilities, atol=1e-6)
    # trainer.predict on the image files: the same classes and probabilities (it prints 4 decimals).
    classes = json.loads((run / "classes.json").read_text())
    predicted = run_cli("trainer.predict", "--model", run, *files)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = predicted.stdout.splitlines()
    for index, path in enumerate(files):
        block = lines[index * 6:(index + 1) * 6]
        assert block[0] == str(path)
        best = np.argsort(-probabilities[index], kind="stable")[:5]
        assert [line.split(None, 1)[1] for line in block[1:]] == [classes[i]["name"] for i in best]
        assert [float(line.split()[0]) for line in block[1:]] == pytest.approx(probabilities[index][best], abs=6e-5)


@pytest.mark.parametrize(("model", "expected"), [
    ("no_such_package.models:build", "--model no_such_package.models:build: cannot import module "
                                     "no_such_package.models (ModuleNotFoundError: No module named 'no_such_package'); "
                                     "is its folder on PYTHONPATH?"),
    ("broken:build", "--model broken:build: cannot import module broken (ModuleNotFoundError: No module named "
                     "'no_such_dependency_here')\n"),
    ("mymodels:missing", "--model mymodels:missing: module mymodels ("),
    ("mymodels:raises", "--model mymodels:raises: called with num_classes=10, image_size=64, it raised "
                        "RuntimeError: no GPU, no model"),
    ("mymodels:not_a_model", "--model mymodels:not_a_model: returned a list, not a keras.Model"),
    ("mymodels:logits", "--model mymodels:logits: its outputs are not probabilities (each row in 0..1, summing to 1"),
    ("keras.applications.EfficientNetB9", "--model keras.applications.EfficientNetB9: not a Keras Applications model "
                                          "(did you mean EfficientNetB"),
    ("vgg", "model 'vgg' unknown; choose one of model1, model2, resnet18, resnet50, keras.applications.NAME"),
])
def test_a_model_that_cannot_be_built_is_one_line_and_exit_2(model, expected, user_path, train_shards, tmp_path):
    result = train(train_shards, tmp_path / "out", model, env={"PYTHONPATH": str(user_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0] + "\n", result.stderr[-3000:]
    assert not (tmp_path / "out" / "config.json").exists()


def test_the_saved_model_is_uploaded_to_object_storage(s3_bucket, tmp_path):
    """Keras and TensorFlow write local files only: saved_model/ is written locally, then uploaded
    through fsspec; a second save replaces the first's files."""
    import fsspec
    import tensorflow as tf

    from trainer import saved
    from trainer.models import ModelConfig, build_model

    model = build_model(ModelConfig("model1"), 10, 64)
    classes = [{"index": i, "wnid": f"n{i}", "name": f"class {i}"} for i in range(10)]
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_bucket}/run/saved_model/stale.txt", b"from an earlier attempt")
    saved.save(model, classes, f"s3://{s3_bucket}/run")
    names = sorted(path.split("/run/", 1)[1] for path in fs.find(f"{s3_bucket}/run"))
    assert names == ["classes.json", "model.keras", "saved_model/fingerprint.pb", "saved_model/saved_model.pb",
                     "saved_model/variables/variables.data-00000-of-00001", "saved_model/variables/variables.index"]
    fs.get(f"{s3_bucket}/run/saved_model", str(tmp_path / "saved_model"), recursive=True)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    served = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"](images=images)
    assert np.allclose(served["probabilities"], model(images), atol=1e-6)


def test_a_model_with_layers_of_its_own_loads_where_its_module_is_importable(user_path, train_shards, tmp_path):
    out = tmp_path / "fancy"
    assert train(train_shards, out, "fancy:net", env={"PYTHONPATH": str(user_path)}).returncode == 0
    results = json.loads((out / "results.json").read_text())
    evaluated = run_cli("trainer.evaluate", "--model", out, "--data", train_shards, env={"PYTHONPATH": str(user_path)})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(results["val_top1"], abs=1e-6)
    elsewhere = run_cli("trainer.evaluate", "--model", out, "--data", train_shards)
    assert elsewhere.returncode == 3 and "Traceback" not in elsewhere.stderr
    assert "it was trained with --model fancy:net: if that has layers of its own, module fancy must be importable" \
        in elsewhere.stderr


def test_a_model_saved_before_models_took_uint8_images_still_answers_as_it_did(user_run, tmp_path):
    """model.keras of a run finished before took images the pipeline had scaled: loading it adds the scaling."""
    import shutil

    import keras

    from trainer import saved

    run = tmp_path / "old"
    shutil.copytree(user_run, run)
    model = keras.models.load_model(user_run / "model.keras")
    model.get_layer("tiny").save(run / "model.keras")   # the network alone: float32 scaled images in
    loaded = saved.open_run(str(run)).load_model()
    images = np.random.default_rng(1).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    assert loaded.input.dtype == "uint8"
    assert np.allclose(loaded(images), model(images), atol=1e-6)

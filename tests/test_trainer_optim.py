"""Training recipes: the regularisation losses in the loss that is minimised, decoupled weight
decay, label smoothing, learning-rate schedules and their scaling with the worker count."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import dist, loop, optim
from trainer.config import AUGMENT_PRESETS, LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS, TrainConfig, from_preset
from trainer.loop import Trainer

from .conftest import REPO, run_cli

HOROVODRUN = Path(sys.executable).parent / "horovodrun"
L2 = 0.05


def l2_model(num_classes: int, image_size: int) -> keras.Model:
    """Softmax regression on the mean colour, its kernel under an L2 penalty; no dropout, so a
    step's loss can be recomputed outside the trainer."""
    return keras.Sequential([keras.Input((image_size, image_size, 3)), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(num_classes, activation="softmax",
                                                kernel_regularizer=keras.regularizers.L2(L2),
                                                kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))])


@pytest.fixture
def l2_trainer(train_shards, tmp_path, monkeypatch):
    """A Trainer (one process, Horovod of size 1) whose model is `l2_model`."""
    monkeypatch.setattr(loop, "build_model", lambda config, num_classes, image_size: l2_model(num_classes, image_size))

    def make(**settings) -> Trainer:
        # No augmentation: the step must see the images the test computes the loss of.
        config = TrainConfig(data=str(train_shards), output=str(tmp_path / "out"), batch_size=8,
                             augment=AUGMENT_PRESETS["none"],
                             **{"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0, **settings})
        return Trainer(config, dist.init())

    return make


def test_the_regularisation_loss_is_part_of_the_loss_reported_and_minimised(l2_trainer):
    trainer = l2_trainer()
    kernel = trainer.model.layers[-1].kernel
    before = kernel.numpy()
    # Black images: the data loss gives the kernel no gradient (its input is 0); only the penalty moves it.
    images, labels = tf.zeros([8, 64, 64, 3]), tf.range(8) % 10
    data_loss = float(keras.losses.SparseCategoricalCrossentropy()(labels, trainer.model(images)))
    penalty = L2 * float(np.sum(before ** 2))
    loss = float(trainer.train_step(images, labels, tf.zeros([2]), tf.zeros([2], tf.int64))[0])   # no stop, no checkpoint
    assert loss == pytest.approx(data_loss + penalty, rel=1e-5)
    assert np.linalg.norm(kernel.numpy()) < 0.99 * np.linalg.norm(before)


def test_label_smoothing_changes_the_loss_but_not_the_accuracy_counts(l2_trainer):
    plain, smoothed = l2_trainer(), l2_trainer(label_smoothing=0.2)   # the same seed: the same initial weights
    images = tf.random.stateless_uniform([8, 64, 64, 3], seed=[1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    probabilities = smoothed.model(images).numpy()
    np.testing.assert_array_equal(plain.model(images).numpy(), probabilities)
    penalty = float(tf.add_n(smoothed.model.losses))
    a, b = (t.train_step(images, labels, tf.zeros([2]), tf.zeros([2], tf.int64)).numpy()[:3]
            for t in (plain, smoothed))
    # Targets (1 - e) one-hot + e / K: (1 - e) x cross-entropy + e x the mean of -log p over the classes.
    log_p = np.log(probabilities)
    expected = np.mean(-0.8 * log_p[np.arange(8), labels.numpy()] - 0.2 * log_p.mean(axis=1)) + penalty
    assert b[0] == pytest.approx(expected, rel=1e-5) and b[0] != pytest.approx(a[0], rel=1e-3)
    assert (a[1], a[2]) == (b[1], b[2])   # top-1, top-5 hits: counted on the predictions, not the loss


def config(**settings) -> TrainConfig:
    return TrainConfig(data="unused", output="unused", **settings)


def rates(schedule, steps) -> list[float]:
    return [float(schedule(step)) for step in steps]


def test_the_warm_up_ramps_linearly_from_one_workers_rate_to_the_scaled_rate():
    schedule = optim.build_schedule(config(optimizer="sgd", lr=0.1, warmup_epochs=2), workers=4, steps_per_epoch=10)
    assert rates(schedule, [0, 5, 10, 20, 21, 10_000]) == pytest.approx([0.1, 0.175, 0.25, 0.4, 0.4, 0.4])
    alone = optim.build_schedule(config(optimizer="sgd", lr=0.1, warmup_epochs=0), workers=4, steps_per_epoch=10)
    assert rates(alone, [0, 1]) == pytest.approx([0.4, 0.4])


def test_cosine_decays_from_the_end_of_the_warm_up_to_zero_at_the_end_of_the_last_epoch():
    schedule = optim.build_schedule(config(optimizer="sgd", lr=0.1, warmup_epochs=2, epochs=10, lr_schedule="cosine"),
                                    workers=4, steps_per_epoch=10)
    # Warm-up over steps 0..20, then half a cosine over the 80 steps to step 100, the end of epoch 9.
    assert rates(schedule, [10, 20, 60, 100, 150]) == pytest.approx([0.25, 0.4, 0.2, 0.0, 0.0], abs=1e-7)
    assert 0 < float(schedule(99)) < 1e-3 and float(schedule(40)) == pytest.approx(0.2 * (1 + np.cos(np.pi / 4)))


def test_step_decay_multiplies_by_a_tenth_from_each_decay_epoch_on():
    schedule = optim.build_schedule(config(optimizer="sgd", lr=0.1, warmup_epochs=1, epochs=8, lr_schedule="step",
                                           lr_decay_epochs=(3, 6)), workers=2, steps_per_epoch=10)
    steps = [0, 10, 29, 30, 59, 60, 79]
    assert rates(schedule, steps) == pytest.approx([0.1, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002])


def test_a_schedule_is_a_function_of_the_optimizers_iteration_count_and_serialisable():
    settings = config(optimizer="sgd", lr=0.1, warmup_epochs=1, epochs=8, lr_schedule="step", lr_decay_epochs=(3, 6))
    schedule = optim.build_schedule(settings, workers=2, steps_per_epoch=10)
    again = optim.Schedule.from_config(schedule.get_config())
    assert rates(again, range(0, 80, 5)) == rates(schedule, range(0, 80, 5))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    optimizer = optim.build_optimizer(settings, 2, 10, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    optimizer.iterations.assign(30)   # what restoring a checkpoint does
    assert float(optimizer.learning_rate) == pytest.approx(0.02)


@pytest.mark.parametrize(("optimizer", "rule", "on_1_4_16"), [("sgd", "linear", [0.01, 0.04, 0.16]),
                                                             ("adam", "sqrt", [0.01, 0.02, 0.04]),
                                                             ("adamw", "sqrt", [0.01, 0.02, 0.04])])
def test_each_optimizer_scales_its_rate_with_the_worker_count_by_its_own_rule(optimizer, rule, on_1_4_16):
    settings = config(optimizer=optimizer, lr=0.01)
    assert settings.lr_scaling == rule
    assert [optim.peak_rate(settings, n) for n in (1, 4, 16)] == pytest.approx(on_1_4_16)
    assert optim.peak_rate(config(optimizer=optimizer, lr=0.01, lr_scaling="none"), 16) == pytest.approx(0.01)
    assert optim.peak_rate(config(optimizer=optimizer, lr=0.01, lr_scaling="linear"), 16) == pytest.approx(0.16)


def small_model() -> keras.Model:
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_shrinks_kernels_and_leaves_biases_and_batchnorm_alone(optimizer):
    model = small_model()
    settings = config(optimizer=optimizer, lr=0.5, warmup_epochs=0, weight_decay=0.1)
    decayed = optim.build_optimizer(settings, 1, 10, model.trainable_variables)
    decayed.build(model.trainable_variables)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    # Zero gradients: the update itself moves nothing; only the decay does, by rate x decay.
    decayed.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for variable in model.trainable_variables:
        factor = 1 - 0.5 * 0.1 if variable.name == "kernel" else 1.0
        np.testing.assert_allclose(variable.numpy(), before[variable.path] * factor, rtol=1e-6, err_msg=variable.path)
    assert {v.name for v in model.trainable_variables} == {"kernel", "bias", "gamma", "beta"}


def test_without_weight_decay_nothing_shrinks():
    model = small_model()
    plain = optim.build_optimizer(config(optimizer="sgd", lr=0.5, warmup_epochs=0), 1, 10, model.trainable_variables)
    plain.build(model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]
    plain.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for variable, value in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_the_registries_hold_exactly_the_names_the_config_accepts():
    assert set(optim.SCHEDULES) == set(LR_SCHEDULES)
    assert set(optim.SCALINGS) == set(LR_SCALINGS)
    assert set(optim.BUILDERS) == set(OPTIMIZERS)


def test_defaults_follow_the_optimizer():
    assert (config(optimizer="sgd").lr_scaling, config(optimizer="sgd").weight_decay) == ("linear", 0.0)
    assert (config(optimizer="adam").lr_scaling, config(optimizer="adam").weight_decay) == ("sqrt", 0.0)
    assert (config(optimizer="adamw").lr_scaling, config(optimizer="adamw").weight_decay) == ("sqrt", 0.01)
    assert config(optimizer="adamw", weight_decay=0.0, lr_scaling="linear").weight_decay == 0.0
    # A run saved before --lr-scaling existed scaled every optimizer linearly: resuming it says so.
    saved = config(optimizer="adam").to_json()
    del saved["lr_scaling"]
    assert config(optimizer="adam").differences(saved) == ["lr-scaling linear -> sqrt"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' unknown; choose one of ('adam', 'adamw', 'sgd')"),
    ({"lr_schedule": "linear"}, "lr schedule 'linear' unknown; choose one of ('constant', 'cosine', 'step')"),
    ({"lr_schedule": "step"}, "lr schedule 'step' needs lr decay epochs (e.g. 30,60,80)"),
    ({"lr_schedule": "step", "lr_decay_epochs": (60, 30)}, "lr decay epochs [60, 30] must be increasing whole epochs"),
    ({"lr_schedule": "step", "lr_decay_epochs": (0, 30)}, "lr decay epochs [0, 30] must be increasing whole epochs"),
    ({"lr_schedule": "step", "lr_decay_epochs": (30, 30)}, "lr decay epochs [30, 30] must be increasing"),
    ({"lr_schedule": "cosine", "lr_decay_epochs": (30,)},
     "lr decay epochs [30] are for the step schedule only; lr schedule is 'cosine'"),
    ({"lr_scaling": "log"}, "lr scaling 'log' unknown; choose one of ('linear', 'sqrt', 'none')"),
    ({"optimizer": "sgd", "weight_decay": -1e-4}, "weight decay -0.0001 must be in [0, 1)"),
    ({"optimizer": "adam", "weight_decay": 1e-4}, "weight decay 0.0001 with adam: Adam with decoupled weight decay"),
    ({"label_smoothing": 1.0}, "label smoothing 1.0 must be in [0, 1)"),
    ({"label_smoothing": -0.1}, "label smoothing -0.1 must be in [0, 1)"),
])
def test_settings_out_of_range_are_refused_naming_the_value_and_what_is_allowed(settings, message):
    with pytest.raises(ValueError) as refused:
        config(**settings)
    assert message in str(refused.value)


def test_the_resnet50_preset_is_goyal_et_al_s_recipe():
    preset = from_preset("resnet50-imagenet", "unused", "unused")
    # 0.1 per 256 images of global batch, whatever the worker count: the per-worker rate scales linearly.
    assert preset.lr * 256 / preset.batch_size == pytest.approx(0.1) and preset.lr_scaling == "linear"
    for workers in (1, 8, 32):
        assert optim.peak_rate(preset, workers) == pytest.approx(0.1 * preset.batch_size * workers / 256)
    assert (preset.optimizer, preset.epochs, preset.warmup_epochs) == ("sgd", 90, 5)
    assert (preset.lr_schedule, preset.lr_decay_epochs) == ("step", (30, 60, 80))
    assert (preset.weight_decay, preset.label_smoothing) == (1e-3, 0.1)   # 1e-3 decoupled: 1e-4 L2 / (1 - 0.9)


def parsed(*flags: str) -> TrainConfig:
    from trainer.train import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["--data", "d", "--output", "o", *flags]))


def test_flags_reach_the_config():
    assert parsed("--preset", "resnet50-imagenet", "--lr-schedule", "cosine").lr_decay_epochs == ()
    chosen = parsed("--optimizer", "adamw", "--weight-decay", "0.05", "--label-smoothing", "0.1", "--lr-schedule",
                    "step", "--lr-decay-epochs", "2,4", "--lr-scaling", "linear", "--warmup-epochs", "0")
    assert (chosen.optimizer, chosen.weight_decay, chosen.label_smoothing) == ("adamw", 0.05, 0.1)
    assert (chosen.lr_schedule, chosen.lr_decay_epochs, chosen.lr_scaling, chosen.warmup_epochs) == (
        "step", (2, 4), "linear", 0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr-decay-epochs", "30,x"], "argument --lr-decay-epochs: '30,x' is not a comma-separated list of whole epochs"),
    (["--label-smoothing", "1"], "label smoothing 1.0 must be in [0, 1)"),
    (["--optimizer", "adam", "--weight-decay", "1e-4"], "choose optimizer adamw, or weight decay 0"),
])
def test_bad_flags_exit_2_with_one_line(train_shards, tmp_path, flags, message):
    result = run_cli("trainer.train", "--data", train_shards, "--output", tmp_path / "out", *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cosine_runs_may_not_be_extended_on_resume():
    saved = config(lr_schedule="cosine", epochs=5).to_json()
    assert config(lr_schedule="cosine", epochs=10).differences(saved) == ["epochs 5 -> 10"]
    assert config(epochs=10).differences(config(epochs=5).to_json()) == []


def test_a_run_with_the_new_flags(train_shards, tmp_path):
    out = tmp_path / "out"
    result = run_cli("trainer.train", "--data", train_shards, "--output", out, "--preset", "seed-model1",
                     "--epochs", "3", "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.002",
                     "--weight-decay", "0.05", "--label-smoothing", "0.1", "--warmup-epochs", "1",
                     "--lr-schedule", "step", "--lr-decay-epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert {key: saved[key] for key in ("optimizer", "weight_decay", "label_smoothing", "lr_schedule",
                                        "lr_decay_epochs", "lr_scaling", "warmup_epochs")} == {
        "optimizer": "adamw", "weight_decay": 0.05, "label_smoothing": 0.1, "lr_schedule": "step",
        "lr_decay_epochs": [2], "lr_scaling": "sqrt", "warmup_epochs": 1}
    history = list(csv.DictReader((out / "history.csv").open()))
    # The rate at the end of each epoch (the next step's): warmed up, then x0.1 from epoch 2 on.
    assert [float(row["learning_rate"]) for row in history] == pytest.approx([0.002, 0.0002, 0.0002])
    assert all(np.isfinite(float(row["loss"])) for row in history)


def test_two_workers_scale_adams_rate_by_the_square_root(train_shards, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
                             "trainer.train", "--data", str(train_shards), "--output", str(out), "--preset",
                             "seed-model1", "--epochs", "1", "--batch-size", "32", "--lr", "0.002",
                             "--warmup-epochs", "0"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = csv.DictReader((out / "history.csv").open())
    assert float(row["learning_rate"]) == pytest.approx(0.002 * 2 ** 0.5)

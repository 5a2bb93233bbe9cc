"""Training recipes: the regularisation losses in the loss that is minimised, decoupled weight
decay, label smoothing, learning-rate schedules and their scaling with the worker count."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import dist, loop
from trainer.config import TrainConfig
from trainer.loop import Trainer

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
        config = TrainConfig(data=str(train_shards), output=str(tmp_path / "out"), batch_size=8,
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
    loss = float(trainer.train_step(images, labels)[0])
    assert loss == pytest.approx(data_loss + penalty, rel=1e-5)
    assert np.linalg.norm(kernel.numpy()) < 0.99 * np.linalg.norm(before)

"""Mixed precision on this CPU: bfloat16 (the CPU policy) and float16 with dynamic loss scaling
(the GPU policy; its kernels also run on a CPU), both with float32 weights and a float32 softmax."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import dist
from trainer.config import from_preset
from trainer.loop import Trainer


@pytest.fixture
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("gpu", [False, True])
def test_mixed_precision_trains_with_float32_weights_and_output(train_shards, tmp_path, monkeypatch, gpu,
                                                                float32_afterwards):
    workers = dist.init()   # before a GPU is pretended: Horovod of size 1 on the CPU
    if gpu:   # what set_precision sees on a GPU node: the float16 policy and its loss scaling
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    config = from_preset("seed-model1-aug", str(train_shards), str(tmp_path / "out"), batch_size=32, epochs=1,
                         mixed_precision=True)
    trainer = Trainer(config, workers)
    assert trainer.precision == ("mixed_float16" if gpu else "mixed_bfloat16")
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == gpu
    before = [w.copy() for w in trainer.model.get_weights()]
    trainer.broadcast()
    trainer.start_stream()
    result = trainer.run_epoch(0)
    assert np.isfinite(result.loss) and result.val_samples_seen == 100
    weights = trainer.model.get_weights()
    assert all(w.dtype == np.float32 for w in weights)
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights))   # it trained
    images, _ = next(iter(trainer.data.evaluate("val")))
    compute = "float16" if gpu else "bfloat16"
    assert trainer.model.layers[0].compute_dtype == compute
    assert trainer.model(images, training=False).dtype == tf.float32    # the softmax stays float32
    if gpu:   # the dynamic loss scale is live: steps ran through it and it is a positive finite scale
        scale = float(trainer.optimizer.dynamic_scale)
        assert np.isfinite(scale) and scale > 0
        assert int(trainer.optimizer.iterations) == trainer.data.steps_in_epoch(0, 1)

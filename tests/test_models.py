"""Model registry: output shapes and pinned parameter counts (the seed study's layer lists)."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.errors import UsageError
from trainer.models import MODELS, ModelConfig, build_model

# Hand-checked for the seed models: e.g. model1 = conv 896 + 18,496 + 73,856 + 147,584
# + dense 262,656 + 102,600. Keras counts BatchNorm's moving statistics too (resnet18 is
# torchvision's 11,279,112 for 200 classes with a 3x3 stem, plus 2 x 4,800 BN statistics).
PINNED = {
    ("model1", 64, 200): 606_088,
    ("model2", 64, 200): 1_056_584,
    ("resnet18", 64, 200): 11_281_032,
    ("resnet50", 224, 1000): 25_636_712,
}


@pytest.mark.parametrize(("name", "size", "classes"), list(PINNED))
def test_parameter_counts_are_pinned(name, size, classes):
    assert build_model(ModelConfig(name), classes, size).count_params() == PINNED[(name, size, classes)]


@pytest.mark.parametrize("name", ["model1", "model2", "resnet18"])
def test_output_is_a_distribution_over_the_classes(name):
    model = build_model(ModelConfig(name), 10, 64)
    probabilities = model(np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32"), training=False)
    assert probabilities.shape == (2, 10)
    assert np.allclose(np.sum(probabilities, axis=1), 1.0, atol=1e-5)


def test_seed_model_layer_lists():
    kinds = [type(layer).__name__ for layer in build_model(ModelConfig("model2"), 200, 64).layers]
    assert kinds == ["Conv2D", "Conv2D", "MaxPooling2D", "BatchNormalization", "Dropout",
                     "Conv2D", "Conv2D", "MaxPooling2D", "BatchNormalization", "Dropout",
                     "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "BatchNormalization",
                     "Flatten", "Dropout", "Dense", "Dense", "Dense"]
    model = build_model(ModelConfig("model2", dropout=(0.1, 0.2, 0.3)), 200, 64)
    assert [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"] == [0.1, 0.2, 0.3]


def test_bad_model_configs_are_refused():
    with pytest.raises(ValueError, match="unknown; choose one of model1, model2"):
        ModelConfig("vgg")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        ModelConfig("model2", dropout=(0.5, 1.5, 0.5))
    with pytest.raises(UsageError, match="--dropout 0.5: model2 takes 3 dropout rate"):
        build_model(ModelConfig("model2", dropout=(0.5,)), 10, 64)
    with pytest.raises(UsageError, match="--dropout: model resnet18 has no dropout layers"):
        build_model(ModelConfig("resnet18", dropout=(0.5,)), 10, 64)
    with pytest.raises(UsageError, match="--image-size 16 does not fit --model model1"):
        build_model(ModelConfig("model1"), 10, 16)
    assert set(MODELS) == {"model1", "model2", "resnet18", "resnet50"}

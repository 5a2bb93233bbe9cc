"""Models: the registry's, Keras applications' and a user's function; pinned parameter counts (the seed
study's layer lists); the trained and saved model takes uint8 images and scales them as the input
pipeline did."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.errors import UsageError
from trainer.models import MODELS, ModelConfig, build_model, build_network, dropout_rates
from trainer.models.classifier import MEAN_RGB, STDDEV_RGB, classifier

# Hand-checked for the seed models: e.g. model1 = conv 896 + 18,496 + 73,856 + 147,584
# + dense 262,656 + 102,600. Keras counts BatchNorm's moving statistics too (resnet18 is
# torchvision's 11,279,112 for 200 classes with a 3x3 stem, plus 2 x 4,800 BN statistics).
PINNED = {
    ("model1", 64, 200): 606_088,
    ("model2", 64, 200): 1_056_584,
    ("resnet18", 64, 200): 11_281_032,
    ("resnet50", 224, 1000): 25_636_712,
    # Keras' own counts for weights=None (its unadapted Normalization layer adds 7: mean, variance, count).
    ("keras.applications.EfficientNetB0", 64, 10): 4_062_381,
    ("keras.applications.MobileNetV3Small", 32, 10): 1_540_218,
    ("keras.applications.ResNet50V2", 64, 10): 23_585_290,
}


@pytest.mark.parametrize(("name", "size", "classes"), list(PINNED))
def test_parameter_counts_are_pinned(name, size, classes):
    model = build_model(ModelConfig(name), classes, size)
    assert model.count_params() == PINNED[(name, size, classes)]
    # The uint8 input and the scaling add no weights: checkpoints hold the network's, as before them.
    network = model.get_layer(index=-2)
    assert [w.path for w in model.weights] == [w.path for w in network.weights]


@pytest.mark.parametrize("name", ["model1", "model2", "resnet18", "keras.applications.MobileNetV3Small"])
def test_the_model_takes_uint8_images_and_answers_a_distribution_over_the_classes(name):
    model = build_model(ModelConfig(name), 10, 64)
    assert model.input.dtype == "uint8" and tuple(model.input_shape) == (None, 64, 64, 3)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    probabilities = model(images, training=False)
    assert probabilities.shape == (2, 10) and probabilities.dtype == "float32"
    assert np.allclose(np.sum(probabilities, axis=1), 1.0, atol=1e-5)


def test_the_network_gets_what_the_input_pipeline_gave_it_bit_for_bit():
    """Every uint8 value of every channel becomes ((x / 255) - mean) / std in float32, as the input
    pipeline computed it before the model took uint8 images: training is numerically unchanged."""
    import keras

    size = 16   # 256 pixels: every value once per channel
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, size, size, 1), (1, size, size, 3))
    model = classifier(keras.Sequential([keras.Input((size, size, 3)), keras.layers.Identity()]), size)
    scaled = np.asarray(keras.Model(model.input, model.get_layer("standardize").output)(pixels))
    before = (pixels.astype(np.float32) / np.float32(255) - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)
    assert scaled.dtype == np.float32 and np.array_equal(scaled, before)


def test_a_network_that_scales_its_input_itself_gets_pixel_values():
    import keras

    network = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                keras.layers.Dense(2, activation="softmax")])
    model = classifier(network, 4)
    pixels = np.full((1, 4, 4, 3), 200, np.uint8)
    given = keras.Model(model.input, model.get_layer("pixels").output)(pixels)
    assert np.array_equal(np.asarray(given), pixels.astype(np.float32))
    assert [layer.name for layer in model.layers] == ["images", "pixels", network.name, "probabilities"]


def test_seed_model_layer_lists():
    kinds = [type(layer).__name__ for layer in build_network(ModelConfig("model2"), 200, 64).layers]
    assert kinds == ["Conv2D", "Conv2D", "MaxPooling2D", "BatchNormalization", "Dropout",
                     "Conv2D", "Conv2D", "MaxPooling2D", "BatchNormalization", "Dropout",
                     "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "BatchNormalization",
                     "Flatten", "Dropout", "Dense", "Dense", "Dense"]
    model = build_model(ModelConfig("model2", dropout=(0.1, 0.2, 0.3)), 200, 64)
    assert dropout_rates(model) == [0.1, 0.2, 0.3]   # the network's, inside the model


def test_bad_model_configs_are_refused():
    for spec in ("vgg", "my module:build", "mymodels:", "keras.applications.", "keras.applications.a.B"):
        with pytest.raises(ValueError, match="unknown; choose one of model1, model2, resnet18, resnet50, "
                                             "keras.applications.NAME .* or package.module:function"):
            ModelConfig(spec)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        ModelConfig("model2", dropout=(0.5, 1.5, 0.5))
    with pytest.raises(UsageError, match="--dropout 0.5: model2 takes 3 dropout rate"):
        build_model(ModelConfig("model2", dropout=(0.5,)), 10, 64)
    with pytest.raises(UsageError, match="--dropout: model resnet18 has no dropout layers"):
        build_model(ModelConfig("resnet18", dropout=(0.5,)), 10, 64)
    with pytest.raises(UsageError, match="--image-size 16 does not fit --model model1"):
        build_model(ModelConfig("model1"), 10, 16)
    assert set(MODELS) == {"model1", "model2", "resnet18", "resnet50"}

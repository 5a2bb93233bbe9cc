"""The model that is trained and saved: uint8 RGB images in, the network, float32 probabilities out.

Images are scaled inside the model, by built-in Keras layers only, so that `model.keras` and the
SavedModel need no project code: `keras.models.load_model(path)(images)` gives probabilities.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

# ImageNet channel statistics, the convention of Keras applications and torchvision.
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# Normalization divides by sqrt(float32(variance)); squaring float32(std) makes that exactly float32(std)
# (0.224 ** 2 would not), so the layers compute ((x / 255) - mean) / std bit for bit as the input pipeline
# did before they existed: training is numerically what it was.
_VARIANCE_RGB = [float(np.float32(std)) ** 2 for std in STDDEV_RGB]
# Layers that scale a network's input themselves (Keras applications with their own preprocessing).
_SCALING = (layers.Rescaling, layers.Normalization)


def classifier(network: keras.Model, image_size: int) -> keras.Model:
    """uint8 [batch, size, size, 3] -> `network` -> float32 [batch, classes]. The network gets pixels
    standardised with the ImageNet mean and deviation, or, when its first layer scales its input
    itself, float32 pixel values 0..255. Adds no weights: its weights are the network's."""
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    # float32 also under a mixed-precision policy: the pipeline normalised in float32 before.
    if scales_itself(network):
        pixels = layers.Rescaling(1.0, dtype="float32", name="pixels")(images)
    else:
        unit = layers.Normalization(mean=0.0, variance=255.0 ** 2, dtype="float32", name="unit_range")(images)
        pixels = layers.Normalization(mean=list(MEAN_RGB), variance=_VARIANCE_RGB, dtype="float32",
                                      name="standardize")(unit)
    # float32 probabilities under a mixed-precision policy too: the loss needs the precision.
    probabilities = layers.Activation("linear", dtype="float32", name="probabilities")(network(pixels))
    return keras.Model(images, probabilities, name="classifier")


def scales_itself(network: keras.Model) -> bool:
    """Whether the network's first layer rescales or normalises its input (EfficientNet, EfficientNetV2,
    ConvNeXt, MobileNetV3: their pixels are 0..255, as with their ImageNet weights)."""
    first = next((layer for layer in network.layers if not isinstance(layer, layers.InputLayer)), None)
    return isinstance(first, _SCALING)

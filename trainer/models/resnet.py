"""The stronger models: ResNet-18 adapted to small (64 px) inputs, and Keras' ResNet-50 for 224 px."""
from __future__ import annotations

import keras
from keras import layers

_STAGES_18 = ((64, 1), (128, 2), (256, 2), (512, 2))   # (filters, first stride), two blocks each


def resnet18(num_classes: int, image_size: int = 64) -> keras.Model:
    """ResNet-18 (basic blocks) with a 3x3 stride-1 stem and no max pool: at 64 px the ImageNet
    stem (7x7 stride 2 + pool) would leave 2x2 maps for the last stage."""
    inputs = keras.Input((image_size, image_size, 3))
    x = _conv_bn(inputs, 64, 3, 1)
    x = layers.ReLU()(x)
    for filters, stride in _STAGES_18:
        x = _basic_block(x, filters, stride)
        x = _basic_block(x, filters, 1)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)  # float32 under mixed precision
    return keras.Model(inputs, outputs, name="resnet18")


def _conv_bn(x, filters: int, kernel: int, stride: int):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
    return layers.BatchNormalization()(x)


def _basic_block(x, filters: int, stride: int):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride)
    y = layers.ReLU()(_conv_bn(x, filters, 3, stride))
    y = _conv_bn(y, filters, 3, 1)
    return layers.ReLU()(layers.Add()([shortcut, y]))


def resnet50(num_classes: int, image_size: int = 224) -> keras.Model:
    """Keras' ResNet-50, randomly initialised (no weights are downloaded); its output cast to
    float32, as under a mixed-precision policy the softmax would otherwise be half precision."""
    model = keras.applications.ResNet50(weights=None, input_shape=(image_size, image_size, 3),
                                        classes=num_classes, classifier_activation="softmax")
    return keras.Model(model.input, layers.Activation("linear", dtype="float32")(model.output), name="resnet50")

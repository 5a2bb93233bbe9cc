"""The two CNNs of the study this project grew from ("Model 1" and "Model 2"), layer for layer:
3x3 convolutions with ReLU and 'valid' padding, 2x2 max pooling, softmax output."""
from __future__ import annotations

import keras
from keras import layers

from ..errors import UsageError


def _conv(filters: int) -> layers.Layer:
    return layers.Conv2D(filters, 3, activation="relu")


def model1(num_classes: int, image_size: int = 64, dropout: tuple[float, ...] = (0.5,)) -> keras.Model:
    """Conv32 -> pool -> Conv64 -> pool -> Conv128 -> pool -> Conv128 -> pool -> Flatten -> Dropout
    -> Dense512 -> Dense(classes)."""
    (rate,) = _rates(dropout, 1, "model1")
    stack = []
    for filters in (32, 64, 128, 128):
        stack += [_conv(filters), layers.MaxPooling2D(2)]
    stack += [layers.Flatten(), layers.Dropout(rate), layers.Dense(512, activation="relu"), _classifier(num_classes)]
    return keras.Sequential([keras.Input((image_size, image_size, 3)), *stack], name="model1")


def model2(num_classes: int, image_size: int = 64, dropout: tuple[float, ...] = (0.5, 0.5, 0.75)) -> keras.Model:
    """Conv32 Conv32 pool BN Dropout | Conv32 Conv64 pool BN Dropout | Conv128 pool Conv128 pool BN
    | Flatten Dropout Dense512 Dense1024 Dense(classes). The study's best run used dropout .5/.5/.75."""
    first, second, third = _rates(dropout, 3, "model2")
    stack = [
        _conv(32), _conv(32), layers.MaxPooling2D(2), layers.BatchNormalization(), layers.Dropout(first),
        _conv(32), _conv(64), layers.MaxPooling2D(2), layers.BatchNormalization(), layers.Dropout(second),
        _conv(128), layers.MaxPooling2D(2), _conv(128), layers.MaxPooling2D(2), layers.BatchNormalization(),
        layers.Flatten(), layers.Dropout(third),
        layers.Dense(512, activation="relu"), layers.Dense(1024, activation="relu"), _classifier(num_classes),
    ]
    return keras.Sequential([keras.Input((image_size, image_size, 3)), *stack], name="model2")


def _classifier(num_classes: int) -> layers.Layer:
    """Softmax in float32 also under a mixed-precision policy: the loss needs the precision."""
    return layers.Dense(num_classes, activation="softmax", dtype="float32")


def _rates(dropout: tuple[float, ...], count: int, model: str) -> tuple[float, ...]:
    if len(dropout) != count:
        rates = ",".join(str(rate) for rate in dropout)
        raise UsageError(f"--dropout {rates}: {model} takes {count} dropout rate(s), got {len(dropout)}")
    return tuple(dropout)

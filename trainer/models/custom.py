"""Models from outside the registry: `package.module:function` (a user's own) and
`keras.applications.NAME` (a Keras Applications architecture, randomly initialised). Each resolves
to a builder `(num_classes, image_size, **options) -> keras.Model`; whatever cannot be resolved or
built is a UsageError naming the value."""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable

from ..errors import UsageError

APPLICATIONS = "keras.applications."
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"   # ASCII, as the chart's values schema says
FUNCTION = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}")
APPLICATION = re.compile(rf"{re.escape(APPLICATIONS)}{_IDENTIFIER}")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def builder(name: str) -> Callable:
    """The builder of `name`, a function spec or a keras.applications one (ModelConfig checked its form)."""
    return _application(name) if APPLICATION.fullmatch(name) else _function(name)


def _function(name: str) -> Callable:
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:   # not found, or its own code failed: a syntax error, a missing dependency
        # The hint only when the module itself (or its package) is what is missing, not one it imports.
        missing = isinstance(exc, ModuleNotFoundError) and f"{module_name}.".startswith(f"{exc.name}.")
        raise UsageError(f"--model {name}: cannot import module {module_name} ({reason(exc)})"
                         f"{'; is its folder on PYTHONPATH?' if missing else ''}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise UsageError(f"--model {name}: module {module_name} ({module.__file__}) has no function {function_name}")
    if not callable(function):
        raise UsageError(f"--model {name}: {module_name}.{function_name} is not a function "
                         f"({type(function).__name__})")
    return function


def _application(name: str) -> Callable:
    import keras

    short = name[len(APPLICATIONS):]
    known = sorted(n for n in dir(keras.applications) if _is_application(getattr(keras.applications, n)))
    if short not in known:
        close = difflib.get_close_matches(short, known, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UsageError(f"--model {name}: not a Keras Applications model{hint}; they are {', '.join(known)}")
    application = getattr(keras.applications, short)

    def build(num_classes: int, image_size: int) -> keras.Model:
        # Trained from scratch: no weights are downloaded. Its own preprocessing, if it has one, is kept.
        return application(weights=None, input_shape=(image_size, image_size, 3), classes=num_classes)

    return build


def _is_application(value) -> bool:
    """A model function (keras.applications also holds modules of helpers: efficientnet, imagenet_utils...)."""
    return inspect.isfunction(value) and "classes" in inspect.signature(value).parameters


def import_module_of(name: str) -> str | None:
    """Import a function model's module if it can be, so that custom layers it registers with Keras
    are known when its saved model is loaded (one of built-in layers loads without it). Returns the
    module's name when it cannot be imported here."""
    module = name.partition(":")[0]
    if not FUNCTION.fullmatch(name):
        return None
    try:
        importlib.import_module(module)
    except Exception:   # not on this machine's path: fine unless the model needs its layers
        return module
    return None


def reason(exc: BaseException) -> str:
    """An exception as one line: its type and message."""
    text = " ".join(_ESCAPES.sub("", str(exc)).split())[:300]   # Keras colours its messages
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

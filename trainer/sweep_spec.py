"""trainer.sweep's spec file: checked key by key, then resolved into its trials.

A spec names trainer.train flags (`train:` for every trial, `parameters:` for what varies) and is
checked against trainer.train's own parser and config checks, without TensorFlow: a mistake is one
line naming the key before any trial starts. Trials are a pure function of the spec (the random
strategy draws from its own seeded generator), so a rerun finds the same trial ids, and so the same
outputs to resume.
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .launch import MAX_LOCAL_PODS


class SpecError(UsageError):
    """A spec that cannot be run: exit 2, one line naming the key."""


@dataclass(frozen=True)
class Range:
    """A random strategy's continuous (or whole-number) parameter: uniform, or log-uniform."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class MedianStop:
    """Stop a trial whose val top-5 at an epoch is below the median of the finished trials' at that epoch,
    once at least `min_trials` finished trials reached it, from epoch `start_epoch` (from 0) on."""

    min_trials: int = 3
    start_epoch: int = 1


@dataclass(frozen=True)
class Spec:
    data: str
    output: str
    workers: int
    strategy: str
    trials: int | None
    seed: int
    train: dict[str, Any]
    parameters: dict[str, list | Range]
    median_stop: MedianStop | None


@dataclass(frozen=True)
class Trial:
    index: int
    id: str                      # its folder under the sweep's output
    parameters: dict[str, Any]   # flag name -> value, as in the spec
    flags: list[str]             # trainer.train's command line, all but --output (and --storage-option)
    workers: int

    def identity(self) -> dict:
        """What must not change for a rerun to resume this trial's output."""
        return {"id": self.id, "parameters": self.parameters, "flags": self.flags, "workers": self.workers}


# Flags a trial may not set: the sweep gives each its data and output, storage options come from the
# sweep's own --storage-option, and --restart would throw away what a rerun of the sweep resumes.
RESERVED = {"data": "set it at the top level", "output": "set at the top level; trial i goes to <output>/<trial-id>/",
            "storage-option": "give python -m trainer.sweep --storage-option",
            "restart": "a sweep resumes its trials; use a new output to start over", "help": "not a training flag"}
SIGNIFICANT_DIGITS = 4   # random floats, rounded: readable trial ids, the same values on any machine
ID_LENGTH = 80           # of a trial id's readable part (the index keeps ids unique)


def load(path: str) -> tuple[Spec, list[Trial]]:
    """The spec file at `path` and its trials; SpecError (one line, naming the file and the key) if either
    cannot be run."""
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"--spec {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from None
    try:
        spec = parse(document)
        return spec, trials(spec)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


# --- top-level keys -------------------------------------------------------------------------------

def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{key}: {value!r} is not a URL or path")
    return value


def _whole(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise SpecError(f"{key}: {value!r} is not a whole number " + (f"in {low}..{high}" if high else f">= {low}"))
        return value
    return check


def _strategy(key: str, value: Any) -> str:
    if value not in STRATEGIES:
        raise SpecError(f"{key}: {value!r} unknown; choose one of {', '.join(STRATEGIES)}")
    return value


def _mapping(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{key}: not a mapping of trainer.train flag names to values")
    return value


def _median_stop(key: str, value: Any) -> MedianStop | None:
    if value is False:
        return None
    if value is True:
        return MedianStop()
    fields = {"min-trials": ("min_trials", _whole(1)), "start-epoch": ("start_epoch", _whole(0))}
    if not isinstance(value, dict) or set(value) - set(fields):
        raise SpecError(f"{key}: true, or a mapping of {', '.join(fields)}")
    return MedianStop(**{fields[name][0]: fields[name][1](f"{key}.{name}", v) for name, v in value.items()})


# name -> (check, default)
KEYS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "data": (_text, None), "output": (_text, None), "workers": (_whole(1, MAX_LOCAL_PODS), 1),
    "strategy": (_strategy, "grid"), "trials": (_whole(1), None), "seed": (_whole(0), 0),
    "train": (_mapping, {}), "parameters": (_mapping, None), "median-stop": (_median_stop, None),
}
REQUIRED = ("data", "output", "parameters")


def parse(document: Any) -> Spec:
    """The spec of a loaded YAML document; SpecError names the first key that is wrong."""
    if not isinstance(document, dict):
        raise SpecError(f"not a mapping of keys ({', '.join(KEYS)})")
    unknown = next((key for key in document if key not in KEYS), None)
    if unknown is not None:
        raise SpecError(f"{unknown}: unknown key{_did_you_mean(unknown, KEYS)}; the keys are {', '.join(KEYS)}")
    values = {}
    for key, (check, default) in KEYS.items():
        value = document.get(key)
        if value is None and key in REQUIRED:
            raise SpecError(f"{key}: missing (required)")
        values[key] = default if value is None else check(key, value)
    if values["strategy"] == "random" and values["trials"] is None:
        raise SpecError("trials: missing: the random strategy needs the number of trials to draw")
    if values["strategy"] != "random" and values["trials"] is not None:
        raise SpecError(f"trials: only for strategy random ({values['strategy']} runs every combination)")
    if not values["parameters"]:
        raise SpecError("parameters: empty; give at least one trainer.train flag to vary")
    parser = _parser()
    train = {name: _flag_value(parser, f"train.{name}", name, value) for name, value in values["train"].items()}
    parameters = {name: _values(parser, values["strategy"], name, value)
                  for name, value in values["parameters"].items()}
    both = next((name for name in parameters if name in train), None)
    if both is not None:
        raise SpecError(f"parameters.{both}: also in train; give each flag in one of them")
    return Spec(values["data"], values["output"], values["workers"], values["strategy"], values["trials"],
                values["seed"], train, parameters, values["median-stop"])


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name).replace("_", "-"), list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- flags: checked by trainer.train's own parser -------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from .train import build_parser   # light: the trainer imports TensorFlow only once it runs

    parser = build_parser()

    def refuse(message: str):   # argparse would print its usage and exit
        raise SpecError(message)

    parser.error = refuse
    return parser


def _action(parser: argparse.ArgumentParser, key: str, name: Any) -> argparse.Action:
    # argparse keeps no public index of its options; this one is stable since Python 3.2.
    options = {option[2:]: action for option, action in parser._option_string_actions.items()
               if option.startswith("--")}
    if name in RESERVED:
        raise SpecError(f"{key}: not a trial flag ({RESERVED[name]})")
    action = options.get(name)
    if (isinstance(action, argparse.BooleanOptionalAction) and str(name).startswith("no-")
            and f"--{name[3:]}" in action.option_strings):
        # One key per flag: no-augment and augment would be the same flag twice, and false a double negation.
        raise SpecError(f"{key}: give the flag as {name[3:]}: false (--{name}) or true (--{name[3:]}), "
                        f"not as {name}")
    if name not in options:
        raise SpecError(f"{key}: unknown trainer.train flag{_did_you_mean(name, options)} "
                        f"(python -m trainer.train --help lists them)")
    return options[name]


def flag_arguments(action: argparse.Action, name: str, value: Any) -> list[str]:
    """A flag's command-line words: booleans as the flag's own on/off forms (--augment / --no-augment;
    a plain switch such as --deterministic is left out when false), lists joined by commas."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false (--{name} is a switch)")
        if value:
            return [f"--{name}"]
        if isinstance(action, argparse.BooleanOptionalAction):
            return [f"--no-{name}"]
        return []
    return [f"--{name}", value_text(value, name)]


def canonical_flags(flags: list[str]) -> list[list[str]]:
    """A trial's command line as its options (each --name with its values), sorted: the same flags and values
    in another order (the spec's train keys reordered) are the same trial."""
    groups: list[list[str]] = []
    for word in flags:
        if word.startswith("--") or not groups:
            groups.append([word])
        else:
            groups[-1].append(word)
    return sorted(groups)


def value_text(value: Any, name: str = "") -> str:
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        raise ValueError(f"{value!r} is not a value of --{name} (it takes a value)")
    if isinstance(value, list):
        return ",".join(value_text(item, name) for item in value)
    return str(value)


def _flag_value(parser: argparse.ArgumentParser, key: str, name: str, value: Any) -> Any:
    """`value` once trainer.train's parser accepts it for --name."""
    action = _action(parser, key, name)
    try:
        words = flag_arguments(action, name, value)
    except ValueError as exc:
        raise SpecError(f"{key}: {exc}") from None
    try:
        parser.parse_args(["--data", "-", "--output", "-", *words])
    except SpecError as exc:
        raise SpecError(f"{key}: {exc}") from None
    return value


def _values(parser: argparse.ArgumentParser, strategy: str, name: str, values: Any) -> list | Range:
    key = f"parameters.{name}"
    if isinstance(values, dict):
        return _range(parser, strategy, key, name, values)
    if not isinstance(values, list):
        raise SpecError(f"{key}: {values!r} is not a list of values" +
                        (" or a {min, max, log} range" if strategy == "random" else ""))
    if not values:
        raise SpecError(f"{key}: an empty list; give at least one value")
    checked = [_flag_value(parser, key, name, value) for value in values]
    # A value given twice makes trials that are the same command line (0.5, "0.5" and [0.5] are one value).
    action, seen = _action(parser, key, name), set()
    for value in checked:
        words = tuple(flag_arguments(action, name, value))
        if words in seen:
            raise SpecError(f"{key}: {value!r} is given twice (its trials would be the same); give each value once")
        seen.add(words)
    return checked


def _range(parser: argparse.ArgumentParser, strategy: str, key: str, name: str, spec: dict) -> Range:
    if strategy != "random":
        raise SpecError(f"{key}: a {{min, max}} range needs strategy random ({strategy} takes a list of values)")
    unknown = next((field for field in spec if field not in ("min", "max", "log")), None)
    if unknown is not None or "min" not in spec or "max" not in spec:
        raise SpecError(f"{key}: a range is {{min, max}} and optionally log: true" +
                        (f" ({unknown} unknown)" if unknown is not None else ""))
    if _action(parser, key, name).type not in (int, float):
        raise SpecError(f"{key}: --{name} takes no number; give a list of its values")
    low, high = (_number(f"{key}.{field}", spec[field]) for field in ("min", "max"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{key}.log: {log!r} is not true or false")
    if low > high:
        raise SpecError(f"{key}: min {low:g} is above max {high:g}")
    if log and low <= 0:
        raise SpecError(f"{key}: log: true needs min above 0 (min is {low:g})")
    if _action(parser, key, name).type is int and not (float(low).is_integer() and float(high).is_integer()):
        raise SpecError(f"{key}: --{name} takes whole numbers; min and max must be whole")
    for bound in (low, high):
        _flag_value(parser, key, name, _draw_text(parser, name, bound))
    return Range(low, high, log)


def _number(key: str, value: Any) -> float:
    """A number, also as YAML 1.1 leaves exponents without a dot: 1e-4 is the string '1e-4'."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SpecError(f"{key}: {value!r} is not a number")
    return number


# --- trials ---------------------------------------------------------------------------------------

def _grid(spec: Spec, parser) -> list[dict[str, Any]]:
    """Every combination, the last parameter varying fastest."""
    names = list(spec.parameters)
    return [dict(zip(names, combination)) for combination in itertools.product(*spec.parameters.values())]


def _random(spec: Spec, parser) -> list[dict[str, Any]]:
    """`trials` draws, trial by trial and parameter by parameter in the spec's order: adding trials to a
    spec keeps the earlier ones."""
    rng = random.Random(spec.seed)
    return [{name: _draw(rng, parser, name, values) for name, values in spec.parameters.items()}
            for _ in range(spec.trials)]


def _draw(rng: random.Random, parser, name: str, values: list | Range) -> Any:
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    low, high = (math.log(values.low), math.log(values.high)) if values.log else (values.low, values.high)
    drawn = rng.uniform(low, high)
    return _draw_text(parser, name, math.exp(drawn) if values.log else drawn)


def _draw_text(parser, name: str, value: float) -> int | float:
    if parser._option_string_actions[f"--{name}"].type is int:
        return round(value)
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


STRATEGIES: dict[str, Callable[[Spec, argparse.ArgumentParser], list[dict[str, Any]]]] = {
    "grid": _grid, "random": _random}


def trials(spec: Spec) -> list[Trial]:
    """The spec's trials in order; each one's whole configuration checked as trainer.train would."""
    parser = _parser()
    combinations = STRATEGIES[spec.strategy](spec, parser)
    width = max(3, len(str(len(combinations) - 1)))
    result = []
    for index, parameters in enumerate(combinations):
        trial_id = f"{index:0{width}d}-{_slug(parameters)}"
        flags = ["--data", spec.data]
        for name, value in {**spec.train, **parameters}.items():
            flags += flag_arguments(_action(parser, name, name), name, value)
        _check_config(parser, trial_id, flags)
        result.append(Trial(index, trial_id, parameters, flags, spec.workers))
    return result


def _check_config(parser: argparse.ArgumentParser, trial_id: str, flags: list[str]) -> None:
    """The checks trainer.train makes before it loads TensorFlow (values that do not fit together)."""
    from .train import config_from_args

    try:
        config_from_args(parser.parse_args([*flags, "--output", "-"]))
    except (SpecError, ValueError) as exc:
        raise SpecError(f"trial {trial_id}: {exc}") from None


def _slug(parameters: dict[str, Any]) -> str:
    """A short readable name of the values: augment / no-augment, lr0.001, model-resnet18."""
    parts = []
    for name, value in parameters.items():
        if isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            text = value_text(value, name)
            parts.append(f"{name}{text}" if text[:1].isdigit() else f"{name}-{text}")
    # Safe in a path and an object key on any store; "_" is left to separate the parameters.
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", part) for part in parts)[:ID_LENGTH]

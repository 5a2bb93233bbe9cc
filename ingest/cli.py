"""What every ingest command line shares: logging set-up and turning errors into exit codes."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, IngestError, Terminated

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
T = TypeVar("T")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None,
          build: Callable[[argparse.Namespace], T]) -> tuple[argparse.Namespace, T]:
    """Parse the command line and build its config; a value out of range (ValueError from the
    config's checks) is reported like any other usage error: usage line, message, exit 2."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except ValueError as exc:
        parser.error(str(exc))


def run_main(body: Callable[[], int | None], log_level: str = "INFO", kept: str = "committed shards are kept",
             graceful: bool = False) -> int:
    """Run a CLI body; a user's mistake becomes one line on stderr and an exit code. `kept` says
    what an interrupted run keeps (for the messages on Ctrl-C and SIGTERM). `graceful`: SIGTERM only
    sets a flag (`terminating()`), which the body polls to stop at a point of its choosing and then
    raises Terminated; otherwise it raises Terminated wherever the body is."""
    # Our own messages at the asked level; libraries (botocore, s3fs) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ingest").setLevel(log_level)
    # Kubernetes stops a pod with SIGTERM to its PID 1, which ignores signals it does not handle.
    # Only while the body runs: a SIGTERM while reporting or exiting must not become a traceback.
    previous = signal.signal(signal.SIGTERM, _request_stop if graceful else _terminate)
    try:
        code = body()
    except BaseException as exc:
        signal.signal(signal.SIGTERM, previous)
        return _report(exc, kept)
    signal.signal(signal.SIGTERM, previous)
    return EXIT_OK if code is None else code


def _report(exc: BaseException, kept: str) -> int:
    """One line for an error the user can act on; anything else is re-raised (a bug: its traceback)."""
    if isinstance(exc, IngestError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, Terminated):
        print(f"terminated (SIGTERM): {kept}; rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        print(f"interrupted: {kept}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    raise exc


_terminated = False


def _terminate(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def _request_stop(signum, frame) -> None:
    global _terminated
    _terminated = True


def terminating() -> bool:
    """Whether SIGTERM arrived (with `run_main(graceful=True)`, the body's cue to stop)."""
    return _terminated


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number >= 1")
    return value

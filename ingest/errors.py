"""User-facing errors of the ingest CLIs and the exit code each maps to.

Every error a user can cause (wrong path, unknown layout, missing bucket) is one of these:
the CLI prints its message on one line and exits with its code, never a traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1         # a worker process died, storage kept failing, or an internal error; rerunning resumes
EXIT_USAGE = 2          # bad command line (argparse's own code)
EXIT_INPUT = 3          # input missing, unrecognised or inconsistent
EXIT_OUTPUT = 4         # output location missing, unwritable, or holding a different dataset
EXIT_INCOMPLETE = 5     # finalize found uncommitted shards / verify found mismatches
EXIT_INTERRUPTED = 130  # Ctrl-C; rerunning the same command resumes
EXIT_TERMINATED = 143   # SIGTERM (a pod deleted, evicted or preempted); rerunning resumes

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a worker process died or storage kept failing after retries (or an internal error); rerun to resume",
    EXIT_USAGE: "bad command line",
    EXIT_INPUT: "input missing, unrecognised or inconsistent",
    EXIT_OUTPUT: "output location missing, unwritable or holding a different dataset",
    EXIT_INCOMPLETE: "dataset incomplete (uncommitted shards) or failed verification",
    EXIT_INTERRUPTED: "interrupted; rerun the same command to resume",
    EXIT_TERMINATED: "stopped by SIGTERM (e.g. its pod was deleted or evicted); rerun the same command to resume",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (see cli.run_main)."""


class IngestError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = EXIT_FAILED


class UsageError(IngestError):
    """A flag argparse accepted that cannot be used here (e.g. a port already taken): exit 2 like argparse."""

    exit_code = EXIT_USAGE


class InputError(IngestError):
    exit_code = EXIT_INPUT


class OutputError(IngestError):
    exit_code = EXIT_OUTPUT


class IncompleteError(IngestError):
    exit_code = EXIT_INCOMPLETE


class StorageError(IngestError):
    """Storage still failing once the storage library's own retries are used up (or an I/O
    error such as a full disk): nothing committed is lost, and rerunning resumes."""

    exit_code = EXIT_FAILED

"""User-facing errors of the trainer CLIs, beyond the ingest ones it shares (ingest.errors), and
their exit codes (documented in docs/training.md)."""
from __future__ import annotations

from ingest.errors import EXIT_USAGE, IngestError

EXIT_DIVERGED = 6   # the training loss became NaN or infinite; lower --lr and rerun with --restart
EXIT_STALLED = 7    # no step completed within --stall-timeout (a peer gone or frozen); rerun to resume
EXIT_ATTEMPT_ENDED = 8   # trainer.launch, pod 0: a pod of its rendezvous attempt was replaced, so the
                         # attempt cannot complete; the Job replaces pod 0 and every pod rendezvous again
EXIT_PEER_LOST = 9  # another rank failed or vanished; this one is fine: the cause is the other's failure


class UsageError(IngestError):
    """A flag that argparse accepted but that does not fit (the model, the host): exit 2 like argparse."""

    exit_code = EXIT_USAGE


class ConfigMismatch(UsageError):
    """A rerun whose settings differ from those of the checkpoint it would resume."""


class WorkerLost(IngestError):
    """Another rank died or became unreachable; rerunning resumes from the last checkpoint. Its own
    code, so that a Job counts an incident once (the rank that failed), not once per surviving pod."""

    exit_code = EXIT_PEER_LOST


class PeerStopped(IngestError):
    """Another rank got SIGTERM (its pod preempted or evicted): this one checkpointed with it and stops
    too, with the code of a consequence, which the Job does not count (the preempted pod's own
    failure is the disruption)."""

    exit_code = EXIT_PEER_LOST


class Diverged(IngestError):
    """The loss or the weights are no longer finite: nothing after that can be trusted."""

    exit_code = EXIT_DIVERGED

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged: {what} at epoch {epoch}, step {step}; nothing of epoch {epoch} is "
                         f"saved; lower --lr and rerun with --restart")


class RestoreFailed(IngestError):
    """Rank 0 could not restore the checkpoint (it says why); the other ranks stop with this and
    rank 0's exit code, so that the job's code is the cause's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

"""`python -m trainer.sweep --spec sweep.yaml`: a hyperparameter sweep on this machine, one trial after another.

Each trial is a normal trainer run in <output>/<trial-id>/ (under trainer.launch --local-pods for more
than one worker), so a rerun of the sweep skips the finished trials and the trainer resumes the others
from their checkpoints. The resolved trials are kept in <output>/sweep.json: a rerun refuses a spec that
would rename or re-parameterise them. At the end, <output>/report.md (trainer.report's table, then
each trial's outcome) and report.png (trainer.report's figure).
"""
from __future__ import annotations

import argparse
import codecs
import csv
import dataclasses
import io
import json
import logging
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ingest import cli
from ingest.errors import EXIT_FAILED, InputError, Terminated
from ingest.storage import Location, display, dump_json, read_json, write_atomic

from . import report
from .sweep_spec import MedianStop, Spec, SpecError, Trial, canonical_flags, value_text

log = logging.getLogger("trainer.sweep")

STATE, REPORT_MD, REPORT_PNG = "sweep.json", "report.md", "report.png"
FINISHED, FAILED, STOPPED = "finished", "failed", "stopped"
POLL_SECONDS = 1.0        # how often a running trial's exit and history.csv are looked at
TAIL_BYTES = 64 * 1024    # of a trial's output kept to find its last error line


@dataclass(frozen=True)
class Outcome:
    status: str                    # FINISHED, FAILED or STOPPED (by the median rule)
    exit_code: int | None = None
    detail: str = ""               # a failure's last error line, or why the median rule stopped it


# --- sweep.json: the trials a rerun must find again ------------------------------------------------

def _previous(fs, root: str, trials: list[Trial]) -> dict[str, Outcome]:
    """The outcomes sweep.json recorded; SpecError if the spec's trials are not those it began with
    (a spec may add trials at the end: a random sweep's earlier draws stay the same)."""
    where = display(fs, root)
    if fs.isfile(f"{root}/{report.CONFIG}"):
        raise SpecError(f"output {where} is a trainer run (it holds {report.CONFIG}), not a sweep's output")
    try:
        stored = read_json(fs, f"{root}/{STATE}", invalid=InputError)["trials"]
        previous = {old["id"]: Outcome(**old["outcome"]) for old in stored if old.get("outcome")}
    except FileNotFoundError:
        return {}
    except (KeyError, TypeError) as exc:
        raise InputError(f"{where}/{STATE}: not trainer.sweep's ({type(exc).__name__}: {exc})") from None
    now = [trial.identity() for trial in trials]
    for index, old in enumerate(stored):
        was = {key: old.get(key) for key in ("id", "parameters", "flags", "workers")}
        if index >= len(now):
            raise SpecError(f"the spec makes {len(now)} of the {len(stored)} trials the sweep in {where} began with "
                            f"({STATE}): a spec may add trials, not remove them; use a new output for a new sweep")
        if _comparable(was) != _comparable(now[index]):
            raise SpecError(f"trial {index} would change: it was {_described(was)}, the spec now gives "
                            f"{_described(now[index])} ({where}/{STATE}); use a new output for a new sweep")
    return previous


def _comparable(identity: dict) -> dict:
    """A trial's identity with its flags in a canonical order: reordering the spec's train keys changes nothing."""
    flags = identity.get("flags")
    if isinstance(flags, list) and all(isinstance(word, str) for word in flags):
        return {**identity, "flags": canonical_flags(flags)}
    return identity


def _described(trial: dict) -> str:
    return f"{trial['id']} (workers {trial['workers']}: {shlex.join(trial['flags'] or [])})"


def _save_state(fs, root: str, spec: Spec, trials: list[Trial], outcomes: dict[str, Outcome]) -> None:
    outcome = {trial.id: dataclasses.asdict(outcomes[trial.id]) for trial in trials if trial.id in outcomes}
    write_atomic(fs, f"{root}/{STATE}", dump_json({
        "strategy": spec.strategy, "seed": spec.seed,
        "trials": [trial.identity() | {"outcome": outcome.get(trial.id)} for trial in trials]}))


# --- one trial --------------------------------------------------------------------------------------

def command(spec: Spec, trial: Trial, storage_pairs: list[str]) -> list[str]:
    train = [sys.executable, "-m", "trainer.train", *trial.flags, "--output", trial_url(spec, trial),
             *(f"--storage-option={pair}" for pair in storage_pairs)]
    if trial.workers == 1:
        return train
    # A free port of its own: other jobs on this machine may hold trainer.launch's default.
    return [sys.executable, "-m", "trainer.launch", "--local-pods", str(trial.workers), "--port", str(_free_port()),
            "--", *train]


def trial_url(spec: Spec, trial: Trial) -> str:
    return f"{spec.output.rstrip('/')}/{trial.id}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Tail(threading.Thread):
    """Copies a trial's output to the sweep's stderr as it comes, keeping its end for the report."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.end = stream, b""

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := self.stream.read1(65536):
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
            self.end = (self.end + chunk)[-TAIL_BYTES:]

    def error_line(self) -> str:
        """The last `error: ...` line (the trainer's one-line errors; trainer.launch's name the failed rank
        after it), else the last line."""
        lines = [line.strip() for line in self.end.decode(errors="replace").replace("\r", "\n").splitlines()]
        lines = [line for line in lines if line]
        errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
        return (errors or lines or [""])[-1]


def _run_trial(argv: list[str], rule: MedianStop | None, peers: list[list[float]], fs, path: str) -> Outcome:
    """Run one trial to its end (or until the median rule stops it); SIGTERM or Ctrl-C to the sweep stops
    it at a checkpoint first."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = _Tail(process.stdout)
    tail.start()
    try:
        stopped = _watch(process, rule, peers, fs, path)
    except BaseException:
        _stop(process)
        raise
    finally:
        tail.join(timeout=10)   # a grandchild left behind could hold the pipe open
    code = process.returncode
    if code == 0:
        return Outcome(FINISHED, 0)
    if stopped:
        return Outcome(STOPPED, code, stopped)
    return Outcome(FAILED, code, tail.error_line() or _signal_name(code))


def _watch(process: subprocess.Popen, rule: MedianStop | None, peers: list[list[float]], fs, path: str) -> str:
    """Wait for the trial; returns why the median rule stopped it, or ''."""
    stopped = ""
    while True:
        # The sweep's own SIGTERM (run_main graceful): the trial stops at a checkpoint, then the sweep; also
        # when the trial got it too and is gone already (a whole process group was signalled), so that it is
        # not taken for a failure and the next trial is not started.
        if cli.terminating():
            raise Terminated()
        if process.poll() is not None:
            return stopped
        if rule and not stopped:
            stopped = median_verdict(rule, val_top5(fs, path), peers)
            if stopped:
                log.info("%s: %s", path.rsplit("/", 1)[-1], stopped)
                process.send_signal(signal.SIGTERM)   # the trainer checkpoints and exits 143
        time.sleep(POLL_SECONDS)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM: the trainer (or trainer.launch, which passes it on) checkpoints and exits; a second
    interrupt while waiting kills it."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise


def _signal_name(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else ""


# --- the median stopping rule ----------------------------------------------------------------------

def val_top5(fs, path: str) -> list[float]:
    """A run's val top-5 per epoch from its history.csv (rank 0 rewrites it whole after every epoch)."""
    try:
        text = fs.cat_file(f"{path}/{report.HISTORY}").decode()
    except FileNotFoundError:
        return []
    return [float(row["val_top5"]) for row in csv.DictReader(io.StringIO(text))]


def median_verdict(rule: MedianStop, curve: list[float], peers: list[list[float]]) -> str:
    """Why a trial with this val top-5 curve is to stop, or '': at some epoch from rule.start_epoch on it is
    below the median of the finished trials' (`peers`) at that epoch, with at least rule.min_trials of them."""
    for epoch in range(rule.start_epoch, len(curve)):
        at_epoch = [peer[epoch] for peer in peers if len(peer) > epoch]
        if len(at_epoch) >= rule.min_trials and curve[epoch] < statistics.median(at_epoch):
            return (f"stopped by the median rule at epoch {epoch}: val top-5 {curve[epoch]:.4f} < "
                    f"{statistics.median(at_epoch):.4f}, the median of {len(at_epoch)} finished trials")
    return ""


# --- the sweep --------------------------------------------------------------------------------------

def run(spec: Spec, trials: list[Trial], storage_pairs: list[str], options: dict[str, Any]) -> dict[str, Outcome]:
    """Every trial not finished (or stopped) before, in order; their outcomes, recorded in sweep.json."""
    fs, root = Location(spec.output, options).open()
    outcomes = _previous(fs, root, trials)
    _save_state(fs, root, spec, trials, outcomes)
    for number, trial in enumerate(trials, 1):
        name = f"trial {number}/{len(trials)} {trial.id}"
        path = f"{root}/{trial.id}"
        if fs.isfile(f"{path}/{report.RESULTS}"):
            log.info("%s: finished before, skipped", name)
            outcomes[trial.id] = Outcome(FINISHED, 0)
            continue
        if _status(outcomes, trial) == STOPPED:
            log.info("%s: stopped before by the median rule, skipped", name)
            continue
        peers = [val_top5(fs, f"{root}/{other.id}") for other in trials
                 if spec.median_stop and other is not trial and _status(outcomes, other) == FINISHED]
        argv = command(spec, trial, storage_pairs)
        log.info("%s: %s: %s", name, "resuming" if fs.exists(f"{path}/{report.LATEST}") else "starting",
                 shlex.join(argv))
        started = time.monotonic()
        outcomes[trial.id] = outcome = _run_trial(argv, spec.median_stop, peers, fs, path)
        _save_state(fs, root, spec, trials, outcomes)
        log_outcome = log.info if outcome.status != FAILED else log.warning
        log_outcome("%s: %s after %.0f s%s", name, outcome.status, time.monotonic() - started,
                    f" (exit code {outcome.exit_code}: {outcome.detail})" if outcome.status == FAILED else "")
    return outcomes


def _status(outcomes: dict[str, Outcome], trial: Trial) -> str:
    return outcomes[trial.id].status if trial.id in outcomes else ""


def write_report(spec: Spec, trials: list[Trial], outcomes: dict[str, Outcome], options: dict[str, Any]) -> str:
    """<output>/report.md and report.png, as trainer.report makes them, with each trial's outcome; the text."""
    fs, root = Location(spec.output, options).open()
    # trainer.report refuses a prefix without runs: trials that failed before writing their config.json leave none
    started = any(fs.isfile(f"{root}/{trial.id}/{report.CONFIG}") for trial in trials)
    runs = report.load([spec.output], options) if started else []
    table = report.render(report.rows(runs)) if runs else "No trial has started training."
    text = f"# Sweep {spec.output}\n\n{table}\n\n## Trials\n\n{_trials_table(trials, outcomes)}\n"
    write_atomic(fs, f"{root}/{REPORT_MD}", text.encode())
    report.write_plot(runs, f"{spec.output.rstrip('/')}/{REPORT_PNG}", options)
    return text


def _trials_table(trials: list[Trial], outcomes: dict[str, Outcome]) -> str:
    lines = [["Trial", "Parameters", "Status", "Exit code", "Detail"]]
    for trial in trials:
        outcome = outcomes.get(trial.id, Outcome("not run"))
        parameters = " ".join(f"{name}={json.dumps(value) if isinstance(value, bool) else value_text(value)}"
                              for name, value in trial.parameters.items())
        lines.append([trial.id, parameters, outcome.status, "" if outcome.exit_code is None else str(outcome.exit_code),
                      outcome.detail.replace("|", "\\|")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    lines.insert(1, ["-" * width for width in widths])
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines)


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, metavar="SWEEP.yaml", help="the sweep's spec (docs/training.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each trial's id and command and stop: nothing is run or written (a spec that "
                             "conflicts with the output's sweep.json is refused, as by a real run)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for the output and every trial's --data and --output, "
                             "repeatable (e.g. endpoint_url=http://127.0.0.1:9000); credentials come from the "
                             "environment")
    parser.add_argument("--log-level", default="INFO", choices=cli.LOG_LEVELS, help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ingest.storage import parse_storage_options

    args, options = cli.parse(build_parser(), argv, lambda a: parse_storage_options(a.storage_option))
    # graceful: SIGTERM is passed to the running trial, which checkpoints, and the sweep stops after it.
    return cli.run_main(lambda: _main(args, options), args.log_level, graceful=True,
                        kept="finished trials and each trial's last checkpoint are kept")


def _main(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from .sweep_spec import load

    logging.getLogger("trainer").setLevel(args.log_level)
    spec, trials = load(args.spec)
    if args.dry_run:
        # Read-only: a spec the real run would refuse against the output's sweep.json is refused here too.
        fs, root = Location(spec.output, options).open()
        _previous(fs, root, trials)
        for trial in trials:
            print(trial.id, shlex.join(command(spec, trial, args.storage_option)))
        return 0
    log.info("sweep %s: %d trial%s (%s)", spec.output, len(trials), "s" * (len(trials) != 1), spec.strategy)
    outcomes = run(spec, trials, args.storage_option, options)
    print(write_report(spec, trials, outcomes, options), flush=True)
    failed = [trial.id for trial in trials if outcomes[trial.id].status == FAILED]
    if failed:
        log.error("error: %d of %d trials failed (%s); the report says why; rerun to retry them", len(failed),
                  len(trials), ", ".join(failed))
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

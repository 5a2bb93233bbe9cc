"""trainer.sweep: spec checks (no training), the random strategy's repeatability, and real sweeps of short
trainer runs on the tests' generated data - the report against each trial's results.json, a rerun that
runs nothing, a trial resumed after the sweep was killed or stopped by SIGTERM (2 workers), a failed
trial and one stopped by the median rule."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer import sweep, sweep_spec

from .conftest import REPO, run_cli

TRAIN = {"model": "model1", "epochs": 2, "batch-size": 32, "log-level": "WARNING"}
HEADERS = ["RunID", "Model", "TrainAcc", "TrainTop5Acc", "ValAcc", "ValTop5Acc", "Top5Gap", "Dropout",
           "Data Augmentation", "Early Stopping Epoch", "Workers", "Epochs", "Images/s", "Status"]
ACCURACIES = {"TrainAcc": "train_top1", "TrainTop5Acc": "train_top5", "ValAcc": "val_top1", "ValTop5Acc": "val_top5"}


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(spec: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_cli("trainer.sweep", "--spec", spec, *flags)


def start_sweep(spec: Path) -> subprocess.Popen:
    """In a session of its own: killing its process group kills its trial too, as a lost machine would."""
    return subprocess.Popen([sys.executable, "-m", "trainer.sweep", "--spec", str(spec)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.1)


def tables(report_md: str) -> list[list[dict]]:
    """Every markdown table of the report, as rows of header -> cell."""
    found, lines = [], []
    for line in [*report_md.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif lines:
            assert set("".join(lines[1])) <= {"-", " "}
            found.append([dict(zip(lines[0], cells)) for cells in lines[2:]])
            lines = []
    return found


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def history_val_top5(run: Path) -> list[float]:
    with open(run / "history.csv", newline="") as file:
        return [float(row["val_top5"]) for row in csv.DictReader(file)]


# --- the spec: one line naming the key, exit 2, before anything runs -------------------------------

GOOD = {"data": "/data", "output": "/runs/study", "train": {"model": "model1"}, "parameters": {"augment": [True, False]}}


def changed(**changes) -> dict:
    return {key: value for key, value in {**GOOD, **changes}.items() if value is not None}


BAD_SPECS = [
    (changed(outptu="/x"), "outptu: unknown key (did you mean output?)"),
    (changed(data=None), "data: missing (required)"),
    (changed(parameters=None), "parameters: missing (required)"),
    (changed(parameters={}), "parameters: empty; give at least one trainer.train flag to vary"),
    (changed(strategy="bayes"), "strategy: 'bayes' unknown; choose one of grid, random"),
    (changed(strategy="random"), "trials: missing: the random strategy needs the number of trials to draw"),
    (changed(trials=4), "trials: only for strategy random (grid runs every combination)"),
    (changed(workers=0), "workers: 0 is not a whole number in 1..16"),
    (changed(train={"batch_size": 32}), "train.batch_size: unknown trainer.train flag (did you mean batch-size?)"),
    (changed(parameters={"dropuot": ["0.5"]}), "parameters.dropuot: unknown trainer.train flag (did you mean dropout?)"),
    (changed(train={"output": "/elsewhere"}), "train.output: not a trial flag"),
    (changed(train={"restart": True}), "train.restart: not a trial flag"),
    (changed(parameters={"lr": []}), "parameters.lr: an empty list; give at least one value"),
    (changed(parameters={"lr": 0.1}), "parameters.lr: 0.1 is not a list of values"),
    (changed(parameters={"epochs": ["x"]}), "parameters.epochs: argument --epochs: invalid int value: 'x'"),
    (changed(parameters={"optimizer": ["adagrad"]}), "parameters.optimizer: argument --optimizer: invalid choice"),
    (changed(parameters={"augment": ["maybe"]}), "parameters.augment: 'maybe' is not true or false"),
    (changed(parameters={"epochs": [True]}), "parameters.epochs: True is not a value of --epochs"),
    (changed(parameters={"lr": {"min": 0.1, "max": 1}}), "parameters.lr: a {min, max} range needs strategy random"),
    (changed(strategy="random", trials=2, parameters={"lr": {"min": 0.1, "max": 0.01}}),
     "parameters.lr: min 0.1 is above max 0.01"),
    (changed(strategy="random", trials=2, parameters={"lr": {"min": 0, "max": 0.1, "log": True}}),
     "parameters.lr: log: true needs min above 0 (min is 0)"),
    (changed(strategy="random", trials=2, parameters={"lr": {"min": 0.1}}), "parameters.lr: a range is {min, max}"),
    (changed(strategy="random", trials=2, parameters={"model": {"min": 1, "max": 2}}),
     "parameters.model: --model takes no number"),
    (changed(parameters={"model": ["model2"]}), "parameters.model: also in train"),
    (changed(train={"epochs": 0}), "trial 000-augment: epochs 0 must be >= 1"),
    (changed(**{"median-stop": {"min-trials": 0}}), "median-stop.min-trials: 0 is not a whole number >= 1"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[message.split(":")[0] for _, message in BAD_SPECS])
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, spec, message):
    path = write_spec(tmp_path / "sweep.yaml", **spec)
    assert sweep.main(["--spec", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: {message}"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed", "not valid YAML"),
    ("- data\n- output\n", "not a mapping of keys (data, output, workers"),
])
def test_a_file_that_is_no_spec_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    assert sweep.main(["--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: {message}"), err


def test_the_command_line_missing_spec_and_help(tmp_path):
    result = run_sweep(tmp_path / "nowhere.yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --spec {tmp_path / 'nowhere.yaml'}: cannot be read (No such file or directory)"
    probe = ("import runpy, sys\nsys.argv = ['trainer.sweep', '--help']\ntry:\n"
             "    runpy.run_module('trainer.sweep', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print([m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert "--spec" in result.stdout and result.stderr.strip() == "[]"


# --- trials from a spec -----------------------------------------------------------------------------

RANDOM = {"data": "/data", "output": "/runs/random", "strategy": "random", "trials": 6, "seed": 7,
          "train": {"model": "model1"},
          "parameters": {"lr": {"min": "1e-4", "max": 0.1, "log": True}, "batch-size": {"min": 16, "max": 64},
                         "dropout": [[0.2], [0.5]], "augment": [True, False]}}


def test_random_trials_are_the_same_for_the_same_seed(tmp_path, capsys):
    path = write_spec(tmp_path / "random.yaml", **RANDOM)
    _, first = sweep_spec.load(str(path))
    _, again = sweep_spec.load(str(path))
    assert [t.identity() for t in first] == [t.identity() for t in again] and len(first) == 6
    for trial in first:
        assert 1e-4 <= trial.parameters["lr"] <= 0.1 and isinstance(trial.parameters["batch-size"], int)
        assert 16 <= trial.parameters["batch-size"] <= 64
        assert trial.flags[:4] == ["--data", "/data", "--model", "model1"]
        assert ("--augment" if trial.parameters["augment"] else "--no-augment") in trial.flags
        assert trial.id.startswith(f"{trial.index:03d}-lr")
    assert len({t.parameters["lr"] for t in first}) == 6   # drawn, not one value

    other = write_spec(tmp_path / "other.yaml", **{**RANDOM, "seed": 8})
    assert [t.parameters for t in sweep_spec.load(str(other))[1]] != [t.parameters for t in first]
    more = write_spec(tmp_path / "more.yaml", **{**RANDOM, "trials": 9})
    assert [t.identity() for t in sweep_spec.load(str(more))[1][:6]] == [t.identity() for t in first]

    # The command line's dry run lists the same trials, twice alike, and runs nothing.
    assert sweep.main(["--spec", str(path), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert sweep.main(["--spec", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out == listed
    assert [line.split()[0] for line in listed.splitlines()] == [t.id for t in first]
    assert not Path("/runs/random").exists()


def test_grid_trials_and_their_flags(tmp_path):
    path = write_spec(tmp_path / "grid.yaml", data="/data", output="/runs/grid", train={"deterministic": False},
                      parameters={"dropout": ["0.5,0.5,0.5", "0.5,0.5,0.75"], "augment": [True, False]})
    _, trials = sweep_spec.load(str(path))
    assert [t.id for t in trials] == ["000-dropout0.5-0.5-0.5_augment", "001-dropout0.5-0.5-0.5_no-augment",
                                      "002-dropout0.5-0.5-0.75_augment", "003-dropout0.5-0.5-0.75_no-augment"]
    # A switch that is off is left out; an on/off flag takes its --no- form.
    assert trials[3].flags == ["--data", "/data", "--dropout", "0.5,0.5,0.75", "--no-augment"]


def test_median_rule():
    rule = sweep_spec.MedianStop(min_trials=2, start_epoch=1)
    peers = [[0.5, 0.8, 0.9], [0.4, 0.6], [0.3]]
    assert sweep.median_verdict(rule, [0.1], peers) == ""               # epoch 0 is before start-epoch
    assert sweep.median_verdict(rule, [0.1, 0.7], peers) == ""          # above the median 0.7 of 0.8 and 0.6
    assert sweep.median_verdict(rule, [0.1, 0.7, 0.1], peers) == ""     # one peer at epoch 2: too few
    assert sweep.median_verdict(rule, [0.1, 0.69], peers).startswith(
        "stopped by the median rule at epoch 1: val top-5 0.6900 < 0.7000, the median of 2 finished trials")


# --- real sweeps ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid(train_shards, tmp_path_factory):
    """A grid of 2 trials, run, then run again."""
    base = tmp_path_factory.mktemp("sweep")
    spec = write_spec(base / "sweep.yaml", data=str(train_shards), output=str(base / "study"), train=TRAIN,
                      parameters={"augment": [True, False]})
    first = run_sweep(spec)
    assert first.returncode == 0, first.stderr[-3000:]
    mtimes = {path: path.stat().st_mtime_ns for path in (base / "study").glob("*/results.json")}
    return base / "study", spec, first, mtimes


def test_the_report_is_each_trials_results(grid):
    output, _, first, _ = grid
    assert sorted(p.name for p in output.iterdir()) == ["000-augment", "001-no-augment", "report.md", "report.png",
                                                        "sweep.json"]
    text = (output / "report.md").read_text()
    assert first.stdout.strip() == text.strip()
    runs, trials = tables(text)
    assert sorted(row["RunID"] for row in runs) == ["000-augment", "001-no-augment"] and list(runs[0]) == HEADERS
    for row in runs:
        results = results_of(output / row["RunID"])
        for header, key in ACCURACIES.items():
            assert row[header] == f"{results[key]:.4f}", (row["RunID"], header)
        assert row["Data Augmentation"] == ("no" if "no-augment" in row["RunID"] else "yes") == \
            ("yes" if results["augmentation"] else "no")
        assert (row["Workers"], row["Epochs"], row["Status"]) == ("1", "2", "finished")
    assert [(t["Trial"], t["Parameters"], t["Status"], t["Exit code"]) for t in trials] == [
        ("000-augment", "augment=true", "finished", "0"), ("001-no-augment", "augment=false", "finished", "0")]
    state = json.loads((output / "sweep.json").read_text())
    assert [t["outcome"]["status"] for t in state["trials"]] == ["finished", "finished"]
    for trial in ("000-augment", "001-no-augment"):
        assert f"{trial}: starting" in first.stderr and f"{trial}: finished after" in first.stderr


def test_the_report_figure_is_an_image(grid):
    from PIL import Image

    from trainer.report_plot import DPI, figure_size

    with Image.open(grid[0] / "report.png") as image:   # trainer.report's figure of the 2 trials
        assert image.format == "PNG" and image.size == tuple(round(inches * DPI) for inches in figure_size(2))
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(5)) > 4


def test_a_rerun_runs_nothing(grid):
    output, spec, first, mtimes = grid
    again = run_sweep(spec)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stderr and again.stderr.count("finished before, skipped") == 2
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes and len(mtimes) == 2
    assert again.stdout == first.stdout


def test_a_spec_that_changes_the_trials_is_refused(grid, tmp_path):
    output, spec, _, _ = grid
    document = yaml.safe_load(spec.read_text())
    errors = {}
    for name, change in {"epochs": {"train": {**TRAIN, "epochs": 3}},
                         "values": {"parameters": {"augment": [False, True]}},
                         "fewer": {"parameters": {"augment": [True]}}}.items():
        result = run_sweep(write_spec(tmp_path / f"{name}.yaml", **{**document, **change}))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (errors[name],) = [line for line in result.stderr.splitlines() if "error:" in line]
        assert "use a new output for a new sweep" in errors[name] and str(output) in errors[name]
    assert re.match(r"error: trial 0 would change: it was 000-augment \(workers 1: .*--epochs 2 .*\), the spec now "
                    r"gives 000-augment \(workers 1: .*--epochs 3 ", errors["epochs"])
    assert "it was 000-augment (workers 1: " in errors["values"] and "gives 000-no-augment (" in errors["values"]
    assert errors["fewer"].startswith("error: the spec makes 1 of the 2 trials the sweep in")
    assert sorted(p.name for p in output.iterdir())[:2] == ["000-augment", "001-no-augment"]


def test_a_killed_sweep_resumes_its_interrupted_trial(train_shards, tmp_path):
    output = tmp_path / "study"
    spec = write_spec(tmp_path / "sweep.yaml", data=str(train_shards), output=str(output),
                      train={**TRAIN, "epochs": 3}, parameters={"augment": [False]})
    process = start_sweep(spec)
    wait_for(output / "000-no-augment" / "checkpoints" / "latest.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (output / "000-no-augment" / "results.json").exists()

    again = run_sweep(spec)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 1/1 000-no-augment: resuming" in again.stderr
    results = results_of(output / "000-no-augment")
    assert results["start_epoch"] >= 1 and results["epochs_run"] == 3


def test_sigterm_stops_a_two_worker_trial_at_a_checkpoint_and_a_rerun_resumes_it(train_shards, tmp_path):
    output = tmp_path / "study"
    spec = write_spec(tmp_path / "sweep.yaml", data=str(train_shards), output=str(output), workers=2,
                      train={**TRAIN, "epochs": 3}, parameters={"augment": [False]})
    process = start_sweep(spec)
    wait_for(output / "000-no-augment" / "checkpoints" / "latest.json", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("terminated (SIGTERM): finished trials and each trial's last "
                                                "checkpoint are kept; rerun the same command to resume")
    assert "SIGTERM: checkpoint written at" in stderr and not (output / "000-no-augment" / "results.json").exists()
    assert json.loads((output / "sweep.json").read_text())["trials"][0]["outcome"] is None   # not a failure

    again = run_sweep(spec)
    assert again.returncode == 0, again.stderr[-3000:]
    results = results_of(output / "000-no-augment")
    assert results["workers"] == 2 and results["start_epoch"] >= 1 and results["epochs_run"] == 3
    row = tables((output / "report.md").read_text())[0][0]
    assert (row["Workers"], row["ValTop5Acc"]) == ("2", f"{results['val_top5']:.4f}")


def test_a_failed_trial_is_reported_and_a_poor_one_stopped_by_the_median_rule(train_shards, tmp_path):
    """lr 0.001 learns; lr 1e-9 stays at chance and is stopped once its val top-5 at epoch 1 is below the
    finished trial's; lr 1e5 diverges (exit 6). The sweep goes on after each, and exits 1."""
    output = tmp_path / "study"
    spec = write_spec(tmp_path / "sweep.yaml", data=str(train_shards), output=str(output),
                      train={**TRAIN, "epochs": 4, "augment": False, "deterministic": True},
                      parameters={"lr": [0.001, 1.0e-9, 100000]}, **{"median-stop": {"min-trials": 1, "start-epoch": 1}})
    result = run_sweep(spec)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: 1 of 3 trials failed (002-lr100000); the report says "
                                                       "why; rerun to retry them")
    runs, trials = tables((output / "report.md").read_text())
    assert [(t["Trial"], t["Status"], t["Exit code"]) for t in trials] == [
        ("000-lr0.001", "finished", "0"), ("001-lr1e-09", "stopped", "143"), ("002-lr100000", "failed", "6")]
    assert trials[2]["Detail"].startswith("error: training diverged: the loss was nan at epoch 0")

    finished, poor = (history_val_top5(output / name) for name in ("000-lr0.001", "001-lr1e-09"))
    match = re.fullmatch(r"stopped by the median rule at epoch (\d+): val top-5 ([\d.]+) < ([\d.]+), the median of "
                         r"1 finished trials", trials[1]["Detail"])
    assert match, trials[1]["Detail"]
    epoch = int(match[1])
    assert epoch >= 1 and match[2] == f"{poor[epoch]:.4f}" and match[3] == f"{finished[epoch]:.4f}"
    assert len(poor) < 4 and not (output / "001-lr1e-09" / "results.json").exists()
    assert {row["RunID"]: row["Status"] for row in runs}["001-lr1e-09"] == "unfinished"

    # A rerun retries the failed trial only: the stopped one stays stopped.
    again = run_sweep(spec)
    assert again.returncode == 1
    assert "001-lr1e-09: stopped before by the median rule, skipped" in again.stderr
    assert "002-lr100000: starting" in again.stderr and "000-lr0.001: finished before, skipped" in again.stderr


def test_a_trial_failing_before_its_first_file_is_still_reported(train_shards, tmp_path):
    output = tmp_path / "study"
    spec = write_spec(tmp_path / "sweep.yaml", data=str(train_shards), output=str(output),
                      train={**TRAIN, "batch-size": 100000}, parameters={"lr": [0.001]})
    result = run_sweep(spec)
    assert result.returncode == 1, result.stderr[-3000:]
    text = (output / "report.md").read_text()
    assert "No trial has started training." in text and (output / "report.png").stat().st_size > 0
    (trial,) = tables(text)[0]
    assert (trial["Status"], trial["Exit code"]) == ("failed", "3")
    assert trial["Detail"] == "error: train split has 1000 samples, fewer than one global batch (100000 x 1 ranks)"


def test_a_sweep_on_s3(train_shards, s3_bucket, tmp_path):
    import s3fs

    output = f"s3://{s3_bucket}/study"
    spec = write_spec(tmp_path / "sweep.yaml", data=str(train_shards), output=output,
                      train={**TRAIN, "epochs": 1}, parameters={"dropout": ["0.3"]})
    result = run_sweep(spec)
    assert result.returncode == 0, result.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    results = json.loads(fs.cat_file(f"{output}/000-dropout0.3/results.json"))
    (row,) = tables(fs.cat_file(f"{output}/report.md").decode())[0]
    assert (row["RunID"], row["ValTop5Acc"], row["Dropout"]) == ("000-dropout0.3", f"{results['val_top5']:.4f}", "0.3")
    assert fs.cat_file(f"{output}/report.png")[:8] == b"\x89PNG\r\n\x1a\n" and fs.isfile(f"{output}/sweep.json")


# --- spec checks against repeats, no- forms and an existing sweep.json (no training) ------------------

@pytest.mark.parametrize("spec, message", [
    (changed(parameters={"dropout": [0.5, 0.5, 0.75]}), "parameters.dropout: 0.5 is given twice"),
    (changed(parameters={"dropout": [[0.5], "0.5"]}), "parameters.dropout: '0.5' is given twice"),
    (changed(parameters={"augment": [True, True]}), "parameters.augment: True is given twice"),
    (changed(train={"no-augment": False}, parameters={"lr": [0.1]}),
     "train.no-augment: give the flag as augment: false (--no-augment) or true (--augment), not as no-augment"),
    (changed(train={"no-augment": True}), "train.no-augment: give the flag as augment: false"),
    (changed(parameters={"no-mixed-precision": [True, False]}), "parameters.no-mixed-precision: give the flag as"),
], ids=["repeated", "repeated-as-list", "repeated-bool", "no-false", "no-and-flag", "no-in-parameters"])
def test_a_repeated_value_or_a_no_form_is_one_line(tmp_path, capsys, spec, message):
    path = write_spec(tmp_path / "sweep.yaml", **spec)
    assert sweep.main(["--spec", str(path), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(f"error: {path}: {message}"), err


def test_dry_run_checks_the_outputs_sweep_json_and_key_order_does_not_matter(tmp_path, capsys):
    output = tmp_path / "study"
    output.mkdir()
    spec = {"data": "/data", "output": str(output), "train": {"model": "model1", "epochs": 2, "augment": False},
            "parameters": {"dropout": ["0.5,0.5,0.5", "0.5,0.5,0.75"]}}
    first, trials = sweep_spec.load(str(write_spec(tmp_path / "first.yaml", **spec)))
    fs, root = sweep.Location(str(output), {}).open()
    sweep._save_state(fs, root, first, trials, {})
    state = (output / "sweep.json").read_text()

    # The same flags and values, train's keys in another order: the same trials, for a dry run and a real one.
    reordered = write_spec(tmp_path / "reordered.yaml",
                           **{**spec, "train": {"augment": False, "epochs": 2, "model": "model1"}})
    assert sweep.main(["--spec", str(reordered), "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sweep._previous(fs, root, sweep_spec.load(str(reordered))[1]) == {}

    # A real change is refused by the dry run as by the real run, and sweep.json is left as it was.
    for name, train in {"value": {"model": "model1", "epochs": 3, "augment": False},
                        "flag": {"model": "model1", "epochs": 2}}.items():
        path = write_spec(tmp_path / f"{name}.yaml", **{**spec, "train": train})
        assert sweep.main(["--spec", str(path), "--dry-run"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, err
        assert err.startswith("error: trial 0 would change: it was 000-dropout0.5-0.5-0.5 ") and \
            "use a new output for a new sweep" in err, err
        with pytest.raises(sweep_spec.SpecError, match="trial 0 would change"):
            sweep._previous(fs, root, sweep_spec.load(str(path))[1])
    assert (output / "sweep.json").read_text() == state

"""trainer.report on real runs: the trainer trained briefly on the tests' generated data, two runs
finished with other settings and one killed after its first checkpoint; every value of the table
compared with the run's own results.json (or checkpoint)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

# Two finished runs that differ in dropout and augmentation (one two levels down, as a sweep's trials
# are), and one killed after its first checkpoint.
RUNS = {
    "aug": ["--preset", "seed-model1-aug", "--epochs", "2"],
    "study/drop02": ["--preset", "seed-model1", "--dropout", "0.2", "--epochs", "3", "--early-stopping-patience", "1"],
}
KILLED = "study/killed"
HEADERS = ["RunID", "Model", "TrainAcc", "TrainTop5Acc", "ValAcc", "ValTop5Acc", "Top5Gap", "Dropout",
           "Data Augmentation", "Early Stopping Epoch", "Workers", "Epochs", "Images/s", "Status"]
ACCURACIES = {"TrainAcc": "train_top1", "TrainTop5Acc": "train_top5", "ValAcc": "val_top1", "ValTop5Acc": "val_top5"}


def train(shards: Path, output: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(output),
                             "--batch-size", "32", "--log-level", "WARNING", *flags], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory) -> Path:
    """The prefix holding the three runs, trained at the same time."""
    prefix = tmp_path_factory.mktemp("report") / "runs"
    finished = {name: train(train_shards, prefix / name, *flags) for name, flags in RUNS.items()}
    killed = train(train_shards, prefix / KILLED, "--preset", "seed-model1", "--epochs", "20")
    deadline = time.monotonic() + 300
    while not (prefix / KILLED / "checkpoints" / "latest.json").exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read()[-3000:]
        time.sleep(0.1)
    killed.kill()
    killed.communicate()
    for name, process in finished.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
    return prefix


def report(*args) -> subprocess.CompletedProcess:
    return run_cli("trainer.report", *args, check=True)


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def expected_row(run: Path) -> dict:
    """What the row must say, from the run's own files: results.json, else its checkpoint's best epoch."""
    if (run / "results.json").exists():
        results = results_of(run)
        return {key: results[key] for key in ("model", "train_top1", "train_top5", "val_top1", "val_top5", "dropout",
                                              "augmentation", "workers", "epochs_run", "images_per_second",
                                              "best_epoch")} | {
            "early_stopping_epoch": results["epochs_run"] - 1 if results["stopped_early"] else None,
            "status": "finished"}
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    config = json.loads((run / "config.json").read_text())
    history = latest["history"]
    best = history[latest["best_epoch"]]
    return {key: best[key] for key in ("train_top1", "train_top5", "val_top1", "val_top5")} | {
        "model": config["model"]["name"], "dropout": config["model"]["dropout"],
        "augmentation": config["augment"]["enabled"], "workers": latest["workers"], "epochs_run": len(history),
        "images_per_second": sum(e["images_per_second"] for e in history) / len(history) * latest["workers"],
        "best_epoch": best["epoch"], "early_stopping_epoch": None, "status": "unfinished"}


def markdown_rows(text: str) -> list[dict]:
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.strip().splitlines()]
    assert lines[0] == HEADERS and set("".join(lines[1])) <= {"-", " "}
    return [dict(zip(HEADERS, cells)) for cells in lines[2:]]


def test_json_rows_are_each_runs_own_values(runs):
    table = json.loads(report(runs, "--format", "json").stdout)
    assert sorted(row["run_id"] for row in table) == sorted([*RUNS, KILLED])
    for row in table:
        expected = expected_row(runs / row["run_id"])
        assert {key: row[key] for key in expected} == expected, row["run_id"]
        assert row["top5_gap"] == pytest.approx(expected["train_top5"] - expected["val_top5"], abs=1e-12)
        assert row["url"] == str(runs / row["run_id"])
    assert results_of(runs / "aug")["augmentation"] and not results_of(runs / "study/drop02")["augmentation"]
    assert results_of(runs / "study/drop02")["dropout"] == [0.2]


def test_markdown_is_the_studys_table_to_4_decimals_best_val_top5_first(runs):
    table = markdown_rows(report(runs).stdout)
    val_top5 = [float(row["ValTop5Acc"]) for row in table]
    assert val_top5 == sorted(val_top5, reverse=True)
    for row in table:
        expected = expected_row(runs / row["RunID"])
        for header, key in ACCURACIES.items():
            assert row[header] == f"{expected[key]:.4f}", (row["RunID"], header)
        assert row["Top5Gap"] == f"{expected['train_top5'] - expected['val_top5']:.4f}"
        assert row["Dropout"] == ",".join(f"{rate:g}" for rate in expected["dropout"])
        assert row["Data Augmentation"] == ("yes" if expected["augmentation"] else "no")
        assert row["Early Stopping Epoch"] == ("-" if expected["early_stopping_epoch"] is None
                                               else str(expected["early_stopping_epoch"]))
        assert (row["Model"], row["Workers"], row["Epochs"], row["Status"]) == (
            expected["model"], str(expected["workers"]), str(expected["epochs_run"]), expected["status"])
        assert row["Images/s"] == f"{expected['images_per_second']:.1f}"
    assert {row["RunID"]: row["Status"] for row in table}[KILLED] == "unfinished"


def test_csv_is_the_same_table(runs):
    rows = list(csv.DictReader(io.StringIO(report(runs, "--format", "csv").stdout)))
    assert rows == [{key: "" if value == "-" else value for key, value in row.items()}
                    for row in markdown_rows(report(runs).stdout)]


def test_a_single_run_is_named_by_its_last_path_component(runs):
    (row,) = json.loads(report(runs / "study" / "drop02", "--format", "json").stdout)
    assert row["run_id"] == "drop02" and row["val_top5"] == results_of(runs / "study/drop02")["val_top5"]


def test_plot_draws_every_curve(runs, tmp_path):
    from PIL import Image

    report(runs, "--plot", tmp_path / "curves" / "val.png")
    with Image.open(tmp_path / "curves" / "val.png") as image:
        assert image.format == "PNG" and image.size == (1150, 550)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # White, black text and grid, and one colour per run at least.
    assert colours is None or len(colours) > 4


def test_an_extended_run_an_early_stop_and_a_run_without_epochs(runs, tmp_path):
    """A finished run rerun with more --epochs (its checkpoint ahead of results.json) is unfinished; a run
    that stopped early names its last epoch; a run before its first checkpoint is listed last, values unknown."""
    from trainer import report as library

    prefix = tmp_path / "copies"
    for name in ("extended", "stopped"):
        shutil.copytree(runs / "aug", prefix / name)
    (prefix / "starting").mkdir()
    shutil.copy(runs / "aug" / "config.json", prefix / "starting")
    latest = json.loads((prefix / "extended/checkpoints/latest.json").read_text())
    latest["history"].append(latest["history"][-1] | {"epoch": len(latest["history"]), "val_top5": 1.0})
    latest["best_epoch"] = len(latest["history"]) - 1
    (prefix / "extended/checkpoints/latest.json").write_text(json.dumps(latest))
    results = results_of(prefix / "stopped") | {"stopped_early": True}
    (prefix / "stopped/results.json").write_text(json.dumps(results))

    rows = {row["run_id"]: row for row in json.loads(library.report([str(prefix)], "json"))}
    assert rows["extended"]["status"] == "unfinished" and rows["extended"]["epochs_run"] == len(latest["history"])
    assert rows["extended"]["val_top5"] == 1.0 and rows["extended"]["early_stopping_epoch"] is None
    assert rows["stopped"]["status"] == "finished"
    assert rows["stopped"]["early_stopping_epoch"] == results["epochs_run"] - 1
    assert rows["starting"] | {"url": None} == {
        "run_id": "starting", "model": "model1", "dropout": [0.5], "augmentation": True, "status": "unfinished",
        "epochs_run": 0, "url": None} | dict.fromkeys(("train_top1", "train_top5", "val_top1", "val_top5", "top5_gap",
                                                       "early_stopping_epoch", "workers", "images_per_second",
                                                       "best_epoch"))
    last = markdown_rows(library.report([str(prefix)]))[-1]
    assert last["RunID"] == "starting" and last["ValTop5Acc"] == last["Workers"] == "-"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_a_url_without_runs_is_one_error_line(tmp_path, where):
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    result = run_cli("trainer.report", tmp_path / where)
    assert result.returncode == 3 and result.stdout == ""
    assert one_error_line(result) == (f"error: {tmp_path / where}: no trainer runs there (a run is a directory "
                                      f"holding config.json; searched up to 3 levels down)")


@pytest.mark.parametrize("flags", [["--format", "xml"], ["--storage-option", "nokey"], []])
def test_a_bad_flag_is_one_error_line(tmp_path, flags):
    result = run_cli("trainer.report", *flags, *([tmp_path] if flags else []))
    assert result.returncode == 2
    one_error_line(result)


def test_help_loads_neither_tensorflow_nor_matplotlib():
    probe = ("import runpy, sys\n"
             "sys.argv = ['trainer.report', '--help']\n"
             "try:\n"
             "    runpy.run_module('trainer.report', run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    print('exit', exit.code, 'tensorflow' in sys.modules, 'matplotlib' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--format" in result.stdout and result.stderr.strip().splitlines()[-1] == "exit 0 False False"


def test_runs_in_s3_and_the_plot_written_there(runs, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.put(str(runs / "aug"), f"{s3_bucket}/study/aug", recursive=True)
    fs.put(str(runs / KILLED), f"{s3_bucket}/study/sweep/killed", recursive=True)

    table = json.loads(report(f"s3://{s3_bucket}/study", "--format", "json", "--plot",
                              f"s3://{s3_bucket}/study/report.png").stdout)
    local = {"aug": runs / "aug", "sweep/killed": runs / KILLED}
    assert sorted(row["run_id"] for row in table) == sorted(local)
    assert [row["val_top5"] for row in table] == sorted((row["val_top5"] for row in table), reverse=True)
    for row in table:
        expected = expected_row(local[row["run_id"]])
        assert {key: row[key] for key in expected} == expected
        assert row["url"] == f"s3://{s3_bucket}/study/{row['run_id']}"
    assert fs.cat_file(f"{s3_bucket}/study/report.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"model": "x"}'])
def test_an_unreadable_run_is_a_row_and_a_warning_not_the_end_of_the_report(runs, tmp_path, damage):
    prefix = tmp_path / "copies"
    for name in ("good", "bad"):
        shutil.copytree(runs / "aug", prefix / name)
    (prefix / "bad" / "results.json").write_text(damage)
    result = run_cli("trainer.report", prefix, "--plot", tmp_path / "val.png")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert {row["RunID"]: row["Status"] for row in markdown_rows(result.stdout)} == {
        "good": "finished", "bad": "unreadable"}
    (warning,) = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert str(prefix / "bad") in warning
    assert (tmp_path / "val.png").exists()


def test_only_unreadable_runs_is_the_table_then_one_error_line_exit_3(runs, tmp_path):
    shutil.copytree(runs / "aug", tmp_path / "bad")
    (tmp_path / "bad" / "results.json").write_text("[1, 2]")
    result = run_cli("trainer.report", tmp_path / "bad", "--format", "json")
    assert result.returncode == 3 and json.loads(result.stdout)[0]["status"] == "unreadable"
    assert one_error_line(result) == "error: none of the 1 runs found could be read (see the warnings above)"


def test_a_run_given_twice_is_one_row(runs):
    table = json.loads(report(runs / "aug", runs, f"{runs}/aug/", "--format", "json").stdout)
    assert sorted(row["run_id"] for row in table) == sorted(["aug", *(set(RUNS) - {"aug"}), KILLED])


@pytest.mark.parametrize("target", ["dir", "slash"])
def test_plot_into_a_directory_is_one_error_line_exit_2(runs, tmp_path, target):
    plot = str(tmp_path) if target == "dir" else f"{tmp_path}/new/"
    result = run_cli("trainer.report", runs / "aug", "--plot", plot)
    assert result.returncode == 2 and result.stdout == ""
    assert "a directory" in one_error_line(result)
    assert sorted(os.listdir(tmp_path)) == []


def test_plot_of_many_runs_has_a_colour_each_and_the_legend_beside_the_axes(runs):
    from matplotlib.colors import to_hex

    from trainer import report as library
    from trainer.report_plot import SIZE_INCHES, colours, figure_size

    for count in (3, 12, 25, 60):
        assert len({to_hex(colour) for colour in colours(count)}) == count
    assert figure_size(3)[1] == SIZE_INCHES[1] and figure_size(3)[0] > SIZE_INCHES[0]
    assert figure_size(60)[1] > figure_size(20)[1] >= SIZE_INCHES[1]
    (run,) = library.load([str(runs / "aug")])
    many = [library.Run(run.row | {"run_id": f"run{i:02d}"}, run.history) for i in range(25)]
    from io import BytesIO

    from PIL import Image

    from trainer.report_plot import DPI, plot
    with Image.open(BytesIO(plot(many))) as image:
        assert image.size == tuple(round(inches * DPI) for inches in figure_size(25))

"""A real Prometheus (Debian package, on 127.0.0.1, temporary storage, 1 s scrapes) scrapes a real
2-worker training run and a real ingest run; then every expression of the dashboards and of the
rules is evaluated through its HTTP API. Dashboard panels, template variables and recording rules
must return data; alert expressions (thresholds that should not fire here) must evaluate without
error. The ETA panels are also evaluated by promtool on synthetic series younger than their rate
window (a pod just started or replaced), against the ETA the series' own pace gives."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bench.servers import free_port, local_server
from ingest.config import IngestConfig
from ingest.shard import run as run_ingest

from .conftest import REPO

DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
# What Grafana substitutes for the template variables when "All" is selected.
VARIABLES = {"$namespace": ".*", "$job": ".*", "$__rate_interval": "1m", "$__range": "1h"}
# The label the Prometheus Operator (or a kubernetes_sd relabelling) gives every target.
NAMESPACE = "trainer-test"
LABEL_VALUES = re.compile(r"^label_values\((.+), *(\w+)\)$")


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append((f"{path.stem}: {panel['title']}", expr))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    """(what, series selector, label) of every `label_values(selector, label)` template variable."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                selector, label = LABEL_VALUES.match(variable["query"]["query"]).groups()
                for name, value in VARIABLES.items():
                    selector = selector.replace(name, value)
                found.append((f"{path.stem}: variable {variable['name']}", selector, label))
    return found


def label_values(server: str, selector: str, label: str) -> list[str]:
    """What Grafana's label_values(selector, label) asks Prometheus."""
    url = f"{server}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': selector})}"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]


def rule_expressions() -> tuple[list[str], list[str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return [r["record"] for r in rules if "record" in r], [r["expr"] for r in rules if "alert" in r]


def query(server: str, expr: str, at: float | None = None) -> dict:
    url = f"{server}/api/v1/query?{urllib.parse.urlencode({'query': expr, **({'time': at} if at else {})})}"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def panel_expression(name: str) -> str:
    """The expression of the panel `<dashboard>: <title>`, with the variables set to "All"."""
    return dict(dashboard_expressions())[name]


def series_values(offset: int, values: list[float], stale: bool = False) -> str:
    """promtool's notation: `offset` scrapes without a sample, the values, then the target gone."""
    return " ".join(["_"] * offset + [f"{v:g}" for v in values] + (["stale"] if stale else []))


def assert_promtool_eta(tmp_path: Path, panel: str, series: dict[str, str], at: str, truth: float) -> None:
    """The panel's expression over `series` (scraped every 30 s, as the chart does) at `at` has a value
    within 10% of `truth`; promtool shows it when it has not."""
    expr = panel_expression(panel)
    test = {"rule_files": [], "evaluation_interval": "30s", "tests": [{
        "interval": "30s",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "promql_expr_test": [
            {"expr": f"count({expr})", "eval_time": at, "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": f"({expr}) unless abs(({expr}) - {truth}) < {0.1 * truth}", "eval_time": at,
             "exp_samples": []},
        ]}]}
    (tmp_path / "eta_test.yml").write_text(yaml.safe_dump(test))
    result = subprocess.run([shutil.which("promtool"), "test", "rules", "eta_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{panel}, expected about {truth:g} s:\n{result.stdout}{result.stderr}"


def test_trainer_eta_of_a_pod_started_3_minutes_ago(tmp_path):
    """Rank 0's pod was replaced at 21m; at 24m the new one has done 360 steps of 0.5 s, the
    resumed run 4 epochs of 10 of 1000 steps: 5640 steps, 2820 s left. A 10-minute rate of a
    3-minute-old series is 3/10 of the pace; a ratio of two rates of the same age is not."""
    old, new = '{job="t-trainer",instance="10.0.0.1:9400",rank="0"}', '{job="t-trainer",instance="10.0.0.2:9400",rank="0"}'
    steps = range(7)   # 21m to 24m
    series = {}
    for labels, offset, count, epoch, stale in ((old, 0, 40, 0, True), (new, 42, 7, 4, False)):
        series.update({
            f"trainer_step_seconds_count{labels}": series_values(offset, [60 * i for i in range(count)], stale),
            f"trainer_step_seconds_sum{labels}": series_values(offset, [30 * i for i in range(count)], stale),
            f"trainer_epoch_steps_completed{labels}": series_values(offset, [60 * i for i in range(count)], stale),
            f"trainer_epoch{labels}": series_values(offset, [epoch] * count, stale),
            f"trainer_epochs_planned{labels}": series_values(offset, [10] * count, stale),
            f"trainer_epoch_steps_planned{labels}": series_values(offset, [1000] * count, stale),
        })
    assert_promtool_eta(tmp_path, "trainer: ETA", series, "24m", (6 * 1000 - 60 * steps[-1]) * 0.5)


def test_ingest_eta_of_a_worker_started_again_4_minutes_ago(tmp_path):
    """Worker 0 (200 shards) lists for a minute, then commits a shard every 30 s; its pod ends at 20m
    and its replacement, started at 22m, lists again (its counters at 0) until 23m, when it counts
    the 37 shards committed before and goes on at the same pace: at 27m, 45 done, 155 left, 4650 s.
    Worker 1 (60 shards, started at 0) commits one a minute: 27 done, 33 left, 1980 s. The job ends
    with its slowest worker."""
    def worker(labels: str, offset: int, listing: int, committed_before: int, every: int, scrapes: int,
               planned: int, stale: bool) -> dict[str, str]:
        done = [0] * listing + [committed_before + i // every for i in range(scrapes - listing)]
        built = [0] * listing + [i // every for i in range(scrapes - listing)]
        return {f"ingest_shards_committed_total{labels}": series_values(offset, done, stale),
                f"ingest_shard_seconds_count{labels}": series_values(offset, built, stale),
                f"ingest_shard_seconds_sum{labels}": series_values(offset, [30 * every * n for n in built], stale),
                f"ingest_shards_planned{labels}": series_values(offset + listing, [planned] * (scrapes - listing), stale)}

    series = {
        **worker('{job="ingest",instance="10.0.0.1:9400",worker="0"}', 0, 2, 0, 1, 40, 200, True),
        **worker('{job="ingest",instance="10.0.0.2:9400",worker="0"}', 44, 2, 37, 1, 11, 200, False),
        **worker('{job="ingest",instance="10.0.0.3:9400",worker="1"}', 0, 0, 0, 2, 55, 60, False),
    }
    assert_promtool_eta(tmp_path, "ingest: ETA", series, "27m", (200 - 45) * 30)


@pytest.fixture
def prometheus(tmp_path, train_shards):
    """Prometheus scraping two trainer workers (ports P and P+1) and this process's ingest metrics."""
    trainer_port = free_port(span=2)   # rank 0 and rank 1
    taken = {trainer_port, trainer_port + 1}
    ingest_port = next(p for p in iter(free_port, None) if p not in taken)
    port = next(p for p in iter(free_port, None) if p not in taken | {ingest_port})
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "trainer", "static_configs": [
                {"targets": [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{trainer_port + 1}"],
                 "labels": {"namespace": NAMESPACE}}]},
            {"job_name": "ingest", "static_configs": [{"targets": [f"127.0.0.1:{ingest_port}"],
                                                       "labels": {"namespace": NAMESPACE}}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]
    with local_server(command, f"http://127.0.0.1:{port}/-/ready"):
        yield f"http://127.0.0.1:{port}", trainer_port, ingest_port


def test_every_dashboard_and_rule_expression_works_on_real_runs(prometheus, train_shards, tmp_path):
    server, trainer_port, ingest_port = prometheus
    run_ingest(IngestConfig(output=str(tmp_path / "shards"), input=str(train_shards.parent / "tiny"),
                            shard_size=50, processes=1, metrics_port=ingest_port))
    training = subprocess.Popen(
        [str(Path(sys.executable).parent / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
         "-m", "trainer.train", "--data", str(train_shards), "--output", str(tmp_path / "run"), "--preset",
         "seed-model1-aug", "--epochs", "40", "--batch-size", "16", "--metrics-port", str(trainer_port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / "training.log").open("w"))
    records, alerts = rule_expressions()
    rank0 = '{job="trainer",rank="0"}'
    wanted = dashboard_expressions() + [(f"recording rule {r}", r) for r in records] + [
        ("rank 0's steps", f"rate(trainer_step_seconds_count{rank0}[10m]) > 0")]
    variables = variable_queries()
    missing = wanted + variables
    try:
        deadline = time.monotonic() + 240
        while missing and time.monotonic() < deadline and training.poll() is None:
            time.sleep(2)
            at = time.time()
            missing = [(name, expr) for name, expr in wanted
                       if query(server, expr)["status"] != "success" or not query(server, expr)["data"]["result"]]
            missing += [(name, selector) for name, selector, label in variables
                        if not label_values(server, selector, label)]
    finally:
        ended = training.poll()
        training.kill()
        training.wait()
    assert not missing, (f"no data for: {missing}" if ended is None else
                         f"training exited ({ended}): {(tmp_path / 'training.log').read_text()[-3000:]}")
    for expr in alerts:
        assert query(server, expr)["status"] == "success", expr

    # Minutes old, the run is younger than the ETA's 10-minute rate window; its ETA is still the steps
    # left at the pace its own samples show (steps per second of step time), not several times more.
    def value(expr: str) -> float:
        return float(query(server, expr, at)["data"]["result"][0]["value"][1])

    def change(selector: str) -> float:
        samples = query(server, f"{selector}[10m]", at)["data"]["result"][0]["values"]
        return float(samples[-1][1]) - float(samples[0][1])

    left = value(f"(trainer_epochs_planned{rank0} - trainer_epoch{rank0}) * trainer_epoch_steps_planned{rank0}"
                 f" - trainer_epoch_steps_completed{rank0}")
    pace = change(f"trainer_step_seconds_count{rank0}") / change(f"trainer_step_seconds_sum{rank0}")
    eta = value(panel_expression("trainer: ETA"))
    assert 0.5 < eta * pace / left < 2, (eta, pace, left)

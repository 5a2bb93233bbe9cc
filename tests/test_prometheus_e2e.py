"""A real Prometheus (Debian package, on 127.0.0.1, temporary storage, 1 s scrapes) scrapes a real
2-worker training run and a real ingest run; then every expression of the dashboards and of the
rules is evaluated through its HTTP API. Dashboard panels, template variables and recording rules
must return data; alert expressions (thresholds that should not fire here) must evaluate without
error."""
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


def query(server: str, expr: str) -> dict:
    url = f"{server}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


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
    wanted = dashboard_expressions() + [(f"recording rule {r}", r) for r in records]
    variables = variable_queries()
    missing = wanted + variables
    try:
        deadline = time.monotonic() + 240
        while missing and time.monotonic() < deadline and training.poll() is None:
            time.sleep(2)
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

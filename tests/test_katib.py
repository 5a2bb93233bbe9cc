"""Sweeps on the cluster with Kubeflow Katib (no Katib runs here): the chart's Experiment checked as Katib's
validating webhook checks it, the trainer's stdout read as Katib's StdOut collector reads it, and one trial run
on local processes as Katib runs it: its placeholders substituted, pod 0's command wrapped by Katib's shell.

Katib's behaviour is ported from Katib v0.19.0 (commit 578e60f1ce83dbb5e7151026a3bdc4de233947fc, Apache-2.0),
each function naming the Go source it follows."""
from __future__ import annotations

import copy
import datetime
import json
import re
import subprocess
import sys
import time

import helm_python as helm
import kubernetes_validate
import pytest

from bench.servers import free_port
from trainer import katib

from .conftest import REPO, run_cli
from .test_chart import (CHART, GLOO_PORT, NAMESPACE, admits, find, finish, own_metrics_port, render, scenario, selects,
                         start_pod)

# pkg/metricscollector/v1beta1/common/const.go, DefaultFilter: the StdOut collector's filter unless the
# Experiment names another (the chart does not). Go's \w, \d and \s are ASCII: re.ASCII.
KATIB_DEFAULT_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)", re.ASCII)
UNAVAILABLE = "unavailable"            # pkg/controller.v1beta1/consts/const.go, UnavailableMetricValue
ZERO_TIME = "0001-01-01T00:00:00Z"     # Go's time.Time{} in RFC 3339: a line without a timestamp
# manifests/v1beta1/installs/katib-standalone/katib-config.yaml: the algorithms a default install serves.
KATIB_ALGORITHMS = {"random", "tpe", "grid", "hyperband", "bayesianoptimization", "cmaes", "sobol", "multivariate-tpe",
                    "enas", "darts", "pbt"}
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
TRIAL = "t-trainer-x7k2m9qp"   # Katib names trials <experiment>-<8 random characters> (suggestionclient.go)


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def katib_collect(text: str, metrics: list[str]) -> list[tuple[str, str, str]]:
    """(timestamp, name, value) of each metric the collector reports from a log: parseLogsInTextFormat and
    newObservationLog of pkg/metricscollector/v1beta1/file-metricscollector/file-metricscollector.go.
    `metrics`: the objective first, then the additional metrics."""
    logs = []
    for line in text.split("\n"):
        if not any(metric in line for metric in metrics):
            continue
        first, space, _ = line.partition(" ")
        stamp = first if space and RFC3339.fullmatch(first) else ZERO_TIME
        for match in KATIB_DEFAULT_FILTER.finditer(line):
            name, value = match.group(1).strip(), match.group(2).strip()
            if name in metrics:
                logs.append((stamp, name, value))
    if not any(name == metrics[0] for _, name, _ in logs):
        return [(ZERO_TIME, metrics[0], UNAVAILABLE)]
    return logs


def katib_metric(logs: list[tuple[str, str, str]], name: str) -> dict[str, str]:
    """A trial's min, max and latest value of a metric from its observation log, which the database returns
    ORDER BY time: getMetrics of pkg/controller.v1beta1/trial/trial_controller_util.go."""
    metric, latest = dict.fromkeys(("min", "max", "latest"), UNAVAILABLE), None
    for stamp, metric_name, value in sorted(logs, key=lambda log: _time(log[0])):
        if metric_name != name:
            continue
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if metric["min"] == UNAVAILABLE:
                metric["min"] = metric["max"] = value
            elif number < float(metric["min"]):
                metric["min"] = value
            elif number > float(metric["max"]):
                metric["max"] = value
        if latest is None or not latest > _time(stamp):
            latest, metric["latest"] = _time(stamp), value
    return metric


def metric_names(experiment: dict) -> list[str]:
    objective = experiment["spec"]["objective"]
    return [objective["objectiveMetricName"], *objective.get("additionalMetricNames", [])]


def katib_results(experiment: dict, text: str) -> dict[str, float]:
    """The values Katib records for a trial whose pod 0 logged `text`, by the Experiment's metric strategies."""
    logs = katib_collect(text, metric_names(experiment))
    return {s["name"]: float(katib_metric(logs, s["name"])[s["value"]])
            for s in experiment["spec"]["objective"]["metricStrategies"]}


# --- The Experiment, as Katib's validating webhook takes it ---

def katib_trial_template(experiment: dict, values: dict[str, str]) -> dict:
    """The trial template with each ${trialParameters.<name>} replaced by values[name], as Katib replaces them: in
    the template's JSON text (applyParameters of pkg/controller.v1beta1/experiment/manifest/generator.go)."""
    text = json.dumps(experiment["spec"]["trialTemplate"]["trialSpec"])
    for name, value in values.items():
        text = text.replace(f"${{trialParameters.{name}}}", value)
    return json.loads(text)


def katib_trial_job(experiment: dict, trial: str, namespace: str, assignments: dict[str, str]) -> dict:
    """The Job Katib creates for a trial: GetRunSpecWithHyperParameters of generator.go. The trial parameters take
    the suggestion's assignments, or the trial's metadata (${trialSpec.Name}: the trial's name)."""
    values = {}
    for parameter in experiment["spec"]["trialTemplate"]["trialParameters"]:
        meta = re.fullmatch(r"\$\{trialSpec\.(.+?)\}", parameter["reference"])
        values[parameter["name"]] = ({"Name": trial, "Namespace": namespace}[meta.group(1)] if meta
                                     else assignments[parameter["reference"]])
    job = katib_trial_template(experiment, values)
    job["metadata"] |= {"name": trial, "namespace": namespace}
    return job


def katib_validation_errors(experiment: dict) -> list[str]:
    """What Katib's validating webhook refuses in an Experiment the chart may render: ValidateExperiment of
    pkg/webhook/v1beta1/experiment/validator/validator.go (without what needs a running Katib, except the
    algorithm and collector names, checked against a default install's katib-config)."""
    errors = []
    spec, name = experiment["spec"], experiment["metadata"]["name"]
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        errors.append(f"metadata.name {name}: at most 40 characters")
    counts = {key: spec.get(key) for key in ("maxFailedTrialCount", "maxTrialCount", "parallelTrialCount")}
    if counts["maxFailedTrialCount"] is not None and counts["maxFailedTrialCount"] < 0:
        errors.append("maxFailedTrialCount < 0")
    for key in ("maxTrialCount", "parallelTrialCount"):
        if counts[key] is not None and counts[key] <= 0:
            errors.append(f"{key} <= 0")
    if counts["maxTrialCount"] is not None:
        for key in ("maxFailedTrialCount", "parallelTrialCount"):
            if counts[key] is not None and counts[key] > counts["maxTrialCount"]:
                errors.append(f"{key} > maxTrialCount")
    objective = spec.get("objective") or {}
    if objective.get("type") not in ("minimize", "maximize"):
        errors.append("objective.type")
    if not objective.get("objectiveMetricName") or objective["objectiveMetricName"] in objective.get(
            "additionalMetricNames", []):
        errors.append("objective.objectiveMetricName")
    if spec.get("algorithm", {}).get("algorithmName") not in KATIB_ALGORITHMS:
        errors.append("algorithm.algorithmName")
    if spec.get("metricsCollectorSpec", {}).get("collector", {}).get("kind", "StdOut") != "StdOut":
        errors.append("metricsCollectorSpec: the chart's trials print to stdout")
    parameters = spec.get("parameters", [])
    if not parameters:
        errors.append("spec.parameters or spec.nasConfig must be specified")
    for parameter in parameters:
        space, kind = parameter.get("feasibleSpace", {}), parameter.get("parameterType")
        if kind not in ("int", "double", "categorical", "discrete", "unknown"):
            errors.append(f"parameter {parameter['name']}: parameterType")
        if space.get("distribution", "") not in ("", "uniform", "logUniform", "normal", "logNormal", "unknown"):
            errors.append(f"parameter {parameter['name']}: distribution")
        if not space:
            errors.append(f"parameter {parameter['name']}: feasibleSpace must be specified")
        elif kind in ("double", "int") and (space.get("list") or not space.get("min") or not space.get("max")):
            errors.append(f"parameter {parameter['name']}: min and max, no list")
        elif kind in ("categorical", "discrete") and any(space.get(key) for key in ("min", "max", "step")):
            errors.append(f"parameter {parameter['name']}: no min, max or step")
    template = spec.get("trialTemplate") or {}
    if not template.get("primaryContainerName"):
        errors.append("trialTemplate.primaryContainerName")
    if not template.get("successCondition") or not template.get("failureCondition"):
        errors.append("trialTemplate: successCondition and failureCondition")
    if "trialParameters" not in template or "trialSpec" not in template:
        return errors + ["trialTemplate: trialParameters and trialSpec"]
    text = json.dumps(template["trialSpec"])
    names, references = set(), set()
    for parameter in template["trialParameters"]:
        name, reference = parameter.get("name", ""), parameter.get("reference", "")
        if not name or not reference or "{" in name or "}" in name or name in names or reference in references:
            errors.append(f"trialParameter {name}: name and reference, once each")
            continue
        names.add(name)
        references.add(reference)
        meta = re.fullmatch(r"\$\{trialSpec\.(.+?)\}", reference)
        if meta is None and reference not in {p["name"] for p in parameters}:
            errors.append(f"trialParameter {name}: reference {reference} is no parameter")
        elif meta is not None and re.sub(r"\[.+\]$", "", meta.group(1)) not in (
                "Name", "Namespace", "Kind", "APIVersion", "Annotations", "Labels"):
            errors.append(f"trialParameter {name}: {reference} is no trial metadata")
        placeholder = f"${{trialParameters.{name}}}"
        if placeholder not in text:
            return errors + [f"trialParameter {name} is not in the trial template"]
        text = text.replace(placeholder, "test-value")
    if re.findall(r"\$\{trialParameters\..+?\}", text):
        errors.append(f"placeholders without a trialParameter: {re.findall(r'[$][{]trialParameters[.].+?[}]', text)}")
    job = json.loads(text)
    if job.get("metadata", {}).get("name") or job.get("metadata", {}).get("namespace"):
        errors.append("trial template: metadata.name and metadata.namespace must be omitted")
    if not job.get("apiVersion") or not job.get("kind"):
        errors.append("trial template: apiVersion and kind")
    # validateTrialJob: a batch/v1 Job must convert to Kubernetes' Job type with nothing left over.
    if (job.get("apiVersion"), job.get("kind")) == ("batch/v1", "Job"):
        try:
            kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"trial template is no batch/v1 Job: {exc}")
    return errors


def sweep(**sweep_values) -> dict:
    values = scenario("sweep")
    return {**values, "sweep": {**values["sweep"], **sweep_values}}


def experiment_of(values: dict, name: str = "t") -> tuple[dict, list[dict], str]:
    objects, notes = render(values, name=name)
    [experiment] = [o for o in objects if o["kind"] == "Experiment"]
    return experiment, objects, notes


def test_katibs_checks_as_ported_refuse_what_katib_refuses():
    """The port above is not vacuous: each of these Katib refuses (validator_test.go has the same cases)."""
    good, _, _ = experiment_of(scenario("sweep"))
    assert katib_validation_errors(good) == []
    broken = []
    for change in (lambda e: e["metadata"].update(name="x" * 41),
                   lambda e: e["spec"].update(parallelTrialCount=13),
                   lambda e: e["spec"]["objective"].update(additionalMetricNames=["val_top5"]),
                   lambda e: e["spec"]["algorithm"].update(algorithmName="simulated-annealing"),
                   lambda e: e["spec"]["parameters"][0]["feasibleSpace"].pop("max"),
                   lambda e: e["spec"]["trialTemplate"]["trialParameters"].pop(),   # its placeholder stays
                   lambda e: e["spec"]["trialTemplate"]["trialParameters"].append(
                       {"name": "unused", "reference": "lr"}),
                   lambda e: e["spec"]["trialTemplate"]["trialSpec"]["metadata"].update(name="fixed"),
                   lambda e: e["spec"]["trialTemplate"]["trialSpec"]["spec"].update(completion="Indexed")):
        experiment = copy.deepcopy(good)
        change(experiment)
        broken.append(katib_validation_errors(experiment))
    assert all(broken), broken


def test_the_experiment_is_what_katib_accepts():
    values = scenario("sweep")
    experiment, objects, notes = experiment_of(values)
    assert katib_validation_errors(experiment) == []
    # Katib's schema (tests/crds) with any field it does not name refused: test_chart.py, every ci/ scenario.
    assert experiment["apiVersion"] == "kubeflow.org/v1beta1" and experiment["metadata"]["name"] == "t-trainer"
    spec = experiment["spec"]
    # The trainer prints the metrics the Experiment reads, by their last value: the trial's result.
    assert spec["objective"]["type"] == "maximize" and metric_names(experiment) == [katib.OBJECTIVE, *katib.ADDITIONAL]
    assert spec["objective"]["metricStrategies"] == [{"name": n, "value": "latest"} for n in metric_names(experiment)]
    assert spec["objective"]["goal"] == 0.9 and spec["metricsCollectorSpec"] == {"collector": {"kind": "StdOut"}}
    assert spec["algorithm"] == {"algorithmName": "bayesianoptimization",
                                 "algorithmSettings": [{"name": "random_state", "value": "10"}]}
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (12, 3, 3)
    # Katib reads every bound and list item as a string, whatever YAML made of them.
    assert spec["parameters"] == [
        {"name": "lr", "parameterType": "double",
         "feasibleSpace": {"min": "0.0003", "max": "0.003", "distribution": "logUniform"}},
        {"name": "dropout", "parameterType": "categorical", "feasibleSpace": {"list": ["0.3,0.3,0.5", "0.5,0.5,0.75"]}},
        {"name": "batch-size", "parameterType": "discrete", "feasibleSpace": {"list": ["64", "128"]}}]

    # One trial's Job: the chart's own training Job, named and placed by Katib.
    template = spec["trialTemplate"]
    job = katib_trial_job(experiment, TRIAL, "ml", {"lr": "0.0012", "dropout": "0.3,0.3,0.5", "batch-size": "64"})
    kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert template["primaryContainerName"] == container["name"] and container["command"] == [
        "python", "-m", "trainer.launch"]
    args = container["args"]
    train = args[args.index("--") + 1:]
    assert train[:3] == ["python", "-m", "trainer.train"]
    assert train[3:5] == ["--data=s3://datasets/tiny-imagenet", f"--output=s3://runs/model2-sweep/{TRIAL}"]
    # The searched flags last (argparse keeps the last of a flag given twice), after the chart's own.
    assert train[-4:] == ["--katib-metrics", "--lr=0.0012", "--dropout=0.3,0.3,0.5", "--batch-size=64"]
    # Pod i's DNS name, <Job>-<i>.<subdomain> for an Indexed Job, is what trainer.launch looks for.
    service = find(objects, "Service", "t-trainer")
    assert f"--host-template={TRIAL}-{{index}}.t-trainer" in args and pod["spec"]["subdomain"] == "t-trainer"
    assert len(f"{'x' * 40}-{'x' * 8}-99") <= 63   # the longest experiment name Katib allows, pod 99
    pods = [{"labels": {**pod["metadata"]["labels"], "job-name": trial, "batch.kubernetes.io/job-name": trial,
                        "batch.kubernetes.io/job-completion-index": str(index)}, "namespace": NAMESPACE}
            for trial in (TRIAL, "t-trainer-4b2xk9zz") for index in (0, 1)]
    # One headless Service for every trial's pods; the NetworkPolicy lets a trial's pods reach each other.
    assert service["spec"]["clusterIP"] == "None" and all(selects({"matchLabels": service["spec"]["selector"]},
                                                                  p["labels"]) for p in pods)
    for port in (29500, GLOO_PORT):
        assert admits(objects, pods[0], pods[1], port) and admits(objects, pods[1], pods[0], port)
    # Katib's collector wraps pod 0 alone, the one holding rank 0 (trainer.launch's host plan).
    assert [selects({"matchLabels": template["primaryPodLabels"]}, p["labels"]) for p in pods] == [
        True, False, True, False]
    assert template["successCondition"] == 'status.conditions.#(type=="Complete")#|#(status=="True")#'
    assert template["failureCondition"] == 'status.conditions.#(type=="Failed")#|#(status=="True")#'

    # No training Job of its own; Prometheus tells the trials apart by their Jobs' names.
    assert not [o for o in objects if o["kind"] == "Job"]
    [monitor] = [o for o in objects if o["kind"] == "PodMonitor"]
    assert all(e["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_label_job_name"], "targetLabel": "job"}]
               for e in monitor["spec"]["podMetricsEndpoints"])
    assert "Katib Experiment t-trainer" in notes and "katib.kubeflow.org/metrics-collector-injection=enabled" in notes
    assert "python -m trainer.report s3://runs/model2-sweep" in notes and "kubectl -n ml get experiment t-trainer" in notes
    assert "Training:" not in notes

    # An ordinary release: no Experiment, one Job relabelled with its own name.
    objects, _ = render({**values, "sweep": {"enabled": False}})
    assert [o["kind"] for o in objects if o["kind"] in ("Job", "Experiment")] == ["Job"]


def test_the_schema_offers_katibs_algorithms_and_refuses_flags_the_chart_sets():
    import argparse

    from trainer.train import build_parser

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["sweep"]["properties"]
    assert set(schema["algorithm"]["enum"]) <= KATIB_ALGORITHMS
    refused = set(schema["parameters"]["items"]["properties"]["name"]["not"]["enum"])
    flags = {action.option_strings[0][2:]: action for action in build_parser()._actions if action.option_strings}
    assert {"data", "output", "metrics-port", "katib-metrics"} <= refused <= flags.keys()
    # The rest are switches, which take no value (--NAME=VALUE fails).
    assert all(flags[name].nargs == 0 or isinstance(flags[name], argparse.BooleanOptionalAction)
               for name in refused - {"data", "output", "metrics-port"})


@pytest.mark.parametrize("change", [
    {"algorithm": "tpe"}, {"algorithm": ""}, {"maxTrialCount": 0}, {"parallelTrialCount": "3"},
    {"maxFailedTrialCount": -1}, {"goal": 1.5}, {"goal": 0}, {"algorithmSettings": [{"name": "random_state"}]},
    {"parameters": [{"name": "output", "parameterType": "categorical", "feasibleSpace": {"list": ["s3://x"]}}]},
    {"parameters": [{"name": "augment", "parameterType": "categorical", "feasibleSpace": {"list": ["true"]}}]},
    {"parameters": [{"name": "Lr", "parameterType": "double", "feasibleSpace": {"min": 0.1, "max": 1}}]},
    {"parameters": [{"name": "--lr", "parameterType": "double", "feasibleSpace": {"min": 0.1, "max": 1}}]},
    {"parameters": [{"name": "lr", "parameterType": "float", "feasibleSpace": {"min": 0.1, "max": 1}}]},
    {"parameters": [{"name": "lr", "parameterType": "double", "feasibleSpace": {"min": 0.1}}]},
    {"parameters": [{"name": "lr", "parameterType": "double", "feasibleSpace": {"list": ["0.1"]}}]},
    {"parameters": [{"name": "lr", "parameterType": "double", "feasibleSpace": {"min": 0.1, "max": 1, "log": True}}]},
    {"parameters": [{"name": "lr", "parameterType": "double",
                     "feasibleSpace": {"min": 0.1, "max": 1, "distribution": "log"}}]},
    {"parameters": [{"name": "lr", "parameterType": "double",     # Katib's suggestions take no normal
                     "feasibleSpace": {"min": 0.1, "max": 1, "distribution": "normal"}}]},
    {"parameters": [{"name": "optimizer", "parameterType": "categorical", "feasibleSpace": {"list": []}}]},
    {"parameters": [{"name": "optimizer", "parameterType": "categorical",
                     "feasibleSpace": {"list": ["adam"], "min": "1"}}]},
    {"parameters": [{"name": "optimizer", "parameterType": "categorical"}]},
    {"parameter": []}, {"enabled": "true"}])
def test_the_schema_refuses_wrong_sweep_values(change):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(sweep())
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(sweep(**change))


@pytest.mark.parametrize(("values", "message"), [
    (sweep(parameters=[]), "sweep.parameters is required with sweep.enabled"),
    (sweep(parallelTrialCount=13), r"sweep.parallelTrialCount \(13\) may not exceed sweep.maxTrialCount \(12\)"),
    (sweep(maxFailedTrialCount=13), r"sweep.maxFailedTrialCount \(13\) may not exceed sweep.maxTrialCount \(12\)"),
    (sweep(algorithm="grid"), "sweep.parameters lr: the grid algorithm needs feasibleSpace.step for a double"),
    ({**sweep(), "fullnameOverride": "resnet50-imagenet-sweep-learning-rate-and-dropout"},
     "the Experiment's name resnet50-imagenet-sweep-learning-rate-and-dropout is longer than the 40 characters"),
    ({**sweep(), "train": {"enabled": False}}, "sweep.enabled needs train.enabled"),
    ({**sweep(), "output": {"url": ""}}, "output.url is required: the sweep's trials go to <output.url>/<trial name>")])
def test_a_sweep_katib_would_refuse_fails_the_install(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_a_grid_with_steps_renders():
    parameters = [{"name": "lr", "parameterType": "double", "feasibleSpace": {"min": 0.001, "max": 0.003, "step": 0.001}},
                  {"name": "warmup-epochs", "parameterType": "int", "feasibleSpace": {"min": 0, "max": 2}}]
    experiment, _, _ = experiment_of(sweep(algorithm="grid", algorithmSettings=[], parameters=parameters, goal=None,
                                           maxTrialCount=9))
    assert katib_validation_errors(experiment) == []
    assert experiment["spec"]["algorithm"] == {"algorithmName": "grid"} and "goal" not in experiment["spec"]["objective"]
    assert experiment["spec"]["parameters"][0]["feasibleSpace"] == {"min": "0.001", "max": "0.003", "step": "0.001"}


# --- The trainer's stdout, as Katib's StdOut collector reads it ---

def test_katib_reads_each_attempts_result_from_the_trainers_stdout(train_shards, tmp_path):
    """Katib's collector reads pod 0's stdout and stderr (`1>metrics.log 2>&1`), and reports only when the
    pod's command succeeds: a trial resumed by a new pod 0 is read from that pod's log alone."""
    experiment, _, _ = experiment_of(scenario("sweep"))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainer.train", "--data", str(train_shards), "--output", str(out), "--preset",
               "seed-model1-aug", "--batch-size", "32", "--lr", "0.002", "--katib-metrics"]

    def attempt(epochs: int, log: str) -> str:
        with (tmp_path / log).open("w") as metrics_log:
            subprocess.run([*command, "--epochs", str(epochs)], cwd=REPO, stdout=metrics_log,
                           stderr=subprocess.STDOUT, timeout=600, check=True)
        return (tmp_path / log).read_text()

    first = attempt(2, "first.log")
    results = json.loads((out / "results.json").read_text())
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    columns = history[0]
    epochs = [dict(zip(columns, map(float, row))) for row in history[1:]]
    logs = katib_collect(first, metric_names(experiment))
    # One value of each metric per epoch, then the result: nothing else in the log (the epochs' log lines,
    # tqdm, the results' JSON) reads as either metric.
    for name in metric_names(experiment):
        assert [float(value) for _, metric, value in logs if metric == name] == [
            *(epoch[name] for epoch in epochs), results[name]]
    assert all(stamp != ZERO_TIME for stamp, _, _ in logs)
    assert katib_results(experiment, first) == {"val_top5": results["val_top5"], "val_top1": results["val_top1"]}
    assert float(katib_metric(logs, "val_top5")["max"]) == results["val_top5"]

    # A new pod 0 resumes the trial for a third epoch: its log has that epoch and the whole run's result.
    resumed = attempt(3, "resumed.log")
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 3
    assert len([1 for _, metric, _ in katib_collect(resumed, metric_names(experiment)) if metric == "val_top5"]) == 2
    assert katib_results(experiment, resumed) == {"val_top5": results["val_top5"], "val_top1": results["val_top1"]}
    # One more after the run had finished (a pod replaced at the very end): nothing to train, the result again.
    again = attempt(3, "again.log")
    assert katib_results(experiment, again) == {"val_top5": results["val_top5"], "val_top1": results["val_top1"]}
    # Without --katib-metrics the objective is missing: Katib would mark the trial MetricsUnavailable.
    assert katib_collect("epoch 0: loss 2.1, val top-1 0.2 top-5 0.6\n" + json.dumps(results) + "\n",
                         metric_names(experiment)) == [(ZERO_TIME, "val_top5", UNAVAILABLE)]


# --- One trial on local processes, as Katib and Kubernetes run it ---

def katib_wrap(container: dict, metrics_dir: str) -> dict:
    """The primary container of the primary pod as Katib's pod webhook rewrites it for the StdOut collector:
    wrapWorkerContainer and getMarkCompletedCommand of pkg/webhook/v1beta1/pod/utils.go. The sidecar takes the
    trial as succeeded once <pid of sh>.pid says completed, then parses metrics.log."""
    argv = container["command"] + container.get("args", [])
    assert argv[:2] != ["sh", "-c"]
    command = " ".join([*argv, f"1>{metrics_dir}/metrics.log 2>&1", "&&", f"echo completed > {metrics_dir}/$$$$.pid"])
    return {**container, "command": ["sh", "-c"], "args": [command]}


def test_a_trial_runs_on_local_processes_as_katib_runs_it(train_shards, tmp_path):
    """The Experiment's trial Job, its placeholders replaced as Katib replaces them for one suggestion, run as
    two pods: pod 1 as the chart renders it, pod 0 wrapped by Katib's shell command, its output in the
    collector's metrics.log. What Katib would record is the trial's results.json in <output>/<trial>/, and
    trainer.report lists the trial."""
    values = {
        "workers": 2, "gpusPerWorker": 0, "data": {"url": str(train_shards)}, "output": {"url": str(tmp_path / "sweep")},
        "train": {"preset": "seed-model1-aug", "epochs": 3, "batchSize": 32},
        "rendezvous": {"port": free_port()}, "networkInterface": "lo",
        "sweep": {"enabled": True, "algorithm": "random", "parameters": [
            {"name": "lr", "parameterType": "double", "feasibleSpace": {"min": "0.001", "max": "0.004"}},
            {"name": "dropout", "parameterType": "categorical", "feasibleSpace": {"list": ["0.3", "0.5"]}}]},
    }
    experiment, _, _ = experiment_of(values)
    assert katib_validation_errors(experiment) == []
    job = katib_trial_job(experiment, TRIAL, "ml", {"lr": "0.002", "dropout": "0.3"})
    kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
    [trainer] = job["spec"]["template"]["spec"]["containers"]

    # Pod names resolve only in the cluster: here pod 0, the rendezvous server, is 127.0.0.1.
    def local(argv: list[str]) -> list[str]:
        at = argv.index("--")
        return own_metrics_port(argv[:at] + ["--rendezvous-addr=127.0.0.1"] + argv[at:])

    metrics_dir = tmp_path / "katib"
    metrics_dir.mkdir()
    primary = katib_wrap({**trainer, "args": local(trainer["args"])}, str(metrics_dir))
    logs = [tmp_path / f"pod-{i}.log" for i in range(2)]
    late = start_pod(trainer, 1, {}, logs[1], local)
    deadline = time.monotonic() + 120
    while "waiting for the rendezvous server" not in logs[1].read_text():
        assert late.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
        time.sleep(0.2)
    first = start_pod(primary, 0, {}, logs[0])
    try:
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    metrics_log = (metrics_dir / "metrics.log").read_text()
    assert first.returncode == 0, metrics_log[-4000:]
    finish(late, logs[1])
    assert logs[0].read_text() == ""   # all of pod 0's output went to the collector's file
    assert (metrics_dir / f"{first.pid}.pid").read_text() == "completed\n"

    run = tmp_path / "sweep" / TRIAL
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [TRIAL]
    results, config = (json.loads((run / name).read_text()) for name in ("results.json", "config.json"))
    assert (config["lr"], config["model"]["dropout"]) == (0.002, [0.3]) and results["workers"] == 2
    assert results["epochs_run"] == 3 and results["val_top5"] > 0.75   # 10 classes: chance is 0.5
    assert katib_results(experiment, metrics_log) == {"val_top5": results["val_top5"], "val_top1": results["val_top1"]}

    report = json.loads(run_cli("trainer.report", tmp_path / "sweep", "--format", "json", check=True).stdout)
    assert [(row["run_id"], row["val_top5"]) for row in report] == [(TRIAL, results["val_top5"])]

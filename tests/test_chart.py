"""charts/trainer, rendered by Helm's own Go code (helm-python-sdk): lint, schemas of every object, the
properties the chart promises, and its rendered ingest and trainer commands run as local processes."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from bench.servers import S3_TEST_ENV, free_port, local_server

from .conftest import REPO, run_cli, use_s3_endpoint

CHART = REPO / "charts" / "trainer"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
CRDS = {("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-v1.yaml",
        ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.yaml",
        ("kubeflow.org/v1beta1", "Experiment"): "katib-experiment-v1beta1.yaml"}
SECRET = "object-store"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

helm.disable_logging()  # it logs every symbolic link it follows (files/ -> deploy/)


def scenario(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def render(values: dict, chart: Path | str = CHART, name: str = "t", namespace: str = "ml") -> tuple[list[dict], str]:
    """The objects `helm install <name> <chart> -n <namespace>` would create, and its NOTES."""
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=name, namespace=namespace)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    objects = [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
               for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def find(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_templates(objects: list[dict]) -> list[dict]:
    """The pods of the Jobs and of a Katib Experiment's trials."""
    return [job["spec"]["template"] for job in jobs(objects)]


def jobs(objects: list[dict]) -> list[dict]:
    """The Jobs, and the trial Job of a Katib Experiment as its template stands (with Katib's placeholders)."""
    return [o for o in objects if o["kind"] == "Job"] + [
        o["spec"]["trialTemplate"]["trialSpec"] for o in objects if o["kind"] == "Experiment"]


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def strict(schema):
    """Unknown fields are errors (kubectl --validate=strict), except where the CRD leaves an object open."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


CRD_SCHEMAS = {key: strict(yaml.safe_load((REPO / "tests" / "crds" / name).read_text()))
               for key, name in CRDS.items()}


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_lint_passes_strictly(values):
    report = helm.lint(CHART, yaml.safe_load(values.read_text()), strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_every_object_matches_its_schema(values):
    objects, _ = render(yaml.safe_load(values.read_text()))
    version = kubernetes_validate.utils.latest_version()
    for obj in objects:
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            jsonschema.validate(obj, crd)
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    for experiment in (o for o in objects if o["kind"] == "Experiment"):   # Katib's schema leaves its Job open
        kubernetes_validate.validate(experiment["spec"]["trialTemplate"]["trialSpec"], version, strict=True)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {"ServiceAccount", "NetworkPolicy"} and kinds & {"Job", "Experiment"}


def test_schema_catches_mistakes_and_the_urls_are_required():
    with helm.Chart.load(CHART) as chart:
        good = scenario("default")
        chart.validate_schema(good)
        for bad in ({"workers": 0}, {"gpusPerWorker": "8"}, {"train": {"preset": "resnet-50"}},
                    {"train": {"extraArgs": "--lr=0.1"}}, {"restartPolicy": "OnFailure"}, {"wokers": 2},
                    {"s3": {"secretAccessKey": "inline"}}, {"networkPolicy": {"enabled": "yes"}},
                    {"networkPolicy": {"metricsFrom": {"namespaceSelector": {}}}},
                    {"networkPolicy": {"metricsFrom": [{"namespaceSelectors": {}}]}},
                    {"networkPolicy": {"metricsFrom": [{}]}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema({**good, **bad})
        with pytest.raises(helm.HelmRenderError, match="data.url is required"):
            chart.render({"output": {"url": "s3://runs/x"}}, name="t")
        with pytest.raises(helm.HelmRenderError, match="ingest.input is required"):
            chart.render({**good, "ingest": {"enabled": True}}, name="t")


def test_schema_offers_exactly_the_trainers_presets_and_models():
    from trainer.config import PRESETS
    from trainer.models import MODELS

    train = json.loads((CHART / "values.schema.json").read_text())["properties"]["train"]["properties"]
    assert set(train["preset"]["enum"]) == {"", *PRESETS}
    names, specs = train["model"]["anyOf"]
    assert set(names["enum"]) == {"", *MODELS}
    # Beyond the registry, the specs trainer.train takes (ModelConfig), and only those.
    from trainer.models import ModelConfig

    for spec in ("keras.applications.EfficientNetB0", "mymodels:tiny", "my_pkg.sub.models:build_v2", "vgg",
                 "keras.applications.", "mymodels:", "my models:x", "a.b:c.d", ":f", "--model=x"):
        try:
            ModelConfig(spec)
            accepted = True
        except ValueError:
            accepted = False
        assert (re.fullmatch(specs["pattern"].strip("^$"), spec) is not None) == accepted, spec
    with helm.Chart.load(CHART) as chart:   # helm's own schema check agrees
        good = scenario("default")
        for spec in ("resnet18", "keras.applications.EfficientNetB0", "mymodels:tiny"):
            chart.validate_schema({**good, "train": {**good.get("train", {}), "model": spec}})
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({**good, "train": {**good.get("train", {}), "model": "vgg"}})


def test_every_value_has_a_comment():
    """Each value the schema names (not a parent map, not the inside of a free-form value) has a comment above."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, dict | None]] = []  # (indent, schema of the map the line is in)
    checked = 0
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([\w.-]+):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        container = parents[-1][1] if parents else schema
        node = container["properties"][match.group(2)] if container and "properties" in container else None
        parents.append((indent, node))
        if node is None or "properties" in node:  # inside a free-form value, or a parent map
            continue
        checked += 1
        assert lines[number - 1].lstrip().startswith("#"), f"values.yaml:{number + 1}: {line.strip()} has no comment"
    assert checked >= 50


@pytest.mark.parametrize(("name", "container", "permanent"), [("t-trainer", "trainer", [2, 3, 4, 6]),
                                                               ("t-trainer-ingest", "ingest", [2, 3, 4, 5])])
def test_jobs_recover_from_disruptions_without_a_human(name, container, permanent):
    from ingest import errors as ingest_errors
    from trainer import errors as trainer_errors

    values = scenario("ingest")
    values["train"]["enabled"] = True   # both Jobs in one release
    values["output"] = {"url": "s3://runs/r"}
    objects, _ = render(values)
    spec = find(objects, "Job", name)["spec"]
    # Pods replaced, never restarted in place; a replacement only once the failed pod is gone.
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    ignore, fail, *rest = spec["podFailurePolicy"]["rules"]
    # Preemption, eviction, a node drained: not counted against backoffLimit.
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In",
                                                         "values": permanent}}
    # The permanent codes are the CLIs' own: bad flags, bad data, output refused, incomplete, diverged.
    codes = {ingest_errors.EXIT_USAGE, ingest_errors.EXIT_INPUT, ingest_errors.EXIT_OUTPUT,
             ingest_errors.EXIT_INCOMPLETE if container == "ingest" else trainer_errors.EXIT_DIVERGED}
    assert set(permanent) == codes and ingest_errors.EXIT_FAILED not in permanent   # 1: retried
    # A pod whose rank lost another one, or pod 0 ending an attempt a replaced pod broke: the failure that
    # caused it is counted (or is a disruption), not each of its consequences.
    consequences = [] if container == "ingest" else [{"action": "Ignore", "onExitCodes": {
        "containerName": container, "operator": "In",
        "values": [trainer_errors.EXIT_ATTEMPT_ENDED, trainer_errors.EXIT_PEER_LOST]}}]
    assert rest[:len(consequences)] == consequences
    waiting = rest[len(consequences):]
    # The trainer's wait for the ingest: bad flags, or the ingest Job failed (its data will never come).
    wait = {"containerName": "wait-for-data", "operator": "In",
            "values": [ingest_errors.EXIT_USAGE, ingest_errors.EXIT_INPUT]}
    assert waiting == ([{"action": "FailJob", "onExitCodes": wait}] if container == "trainer" else [])
    assert [c["name"] for c in spec["template"]["spec"]["containers"]][0] == container


def test_trainer_job_runs_n_indexed_gpu_pods_behind_a_headless_service():
    values = scenario("4x8-gpus")
    objects, _ = render(values)
    job, service = find(objects, "Job", "t-trainer"), find(objects, "Service", "t-trainer")
    spec, pod = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    # Each pod index's own budget; the Job fails once one index has used it up.
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (3, 0) and "backoffLimit" not in spec
    assert pod["spec"]["restartPolicy"] == "Never"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == "t-trainer" and pod["spec"]["terminationGracePeriodSeconds"] == 120
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not any(set(o["spec"]["template"]["metadata"]["labels"].items()) >= set(service["spec"]["selector"].items())
                   for o in objects if o["kind"] == "Job" and o is not job)

    [container] = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "trainer.launch"]
    args = container["args"]
    separator = args.index("--")
    assert args[:separator] == ["--pods=4", "--slots=8", "--pod-index=$(JOB_COMPLETION_INDEX)",
                                "--host-template=t-trainer-{index}.t-trainer", "--port=29500",
                                "--rendezvous-timeout=600", "--iface=eth0"]
    assert args[separator + 1:] == ["python", "-m", "trainer.train", "--data=s3://datasets/imagenet",
                                    "--output=s3://runs/resnet50", "--preset=resnet50-imagenet", "--epochs=90",
                                    "--batch-size=64", "--metrics-port=9400", "--stall-timeout=300", "--mixed-precision",
                                    "--lr-schedule=cosine"]
    assert container["resources"] == {"requests": {"cpu": "48", "memory": "320Gi"},
                                      "limits": {"memory": "400Gi", "nvidia.com/gpu": 8}}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"rendezvous": 29500, **{f"metrics-{i}": 9400 + i for i in range(8)}}

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm" and mounts["/tmp"] == "tmp" and "medium" not in volumes["tmp"]["emptyDir"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod["spec"][key] == values[key]
    env = {e["name"]: e for e in container["env"]}
    assert env["NCCL_DEBUG"]["value"] == "WARN" and env["AWS_ENDPOINT_URL"]["value"] == values["s3"]["endpoint"]


def test_cpu_workers_get_no_gpu_and_the_cpu_image():
    objects, notes = render({**scenario("default"), "gpusPerWorker": 0})
    [container] = find(objects, "Job", "t-trainer")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "imagenet-k8s-trainer:0.1.0-cpu" and "--slots=1" in container["args"]
    assert "resources" not in container and "2 pods x 1 CPU process(es) = 2 Horovod ranks" in notes
    gpu, _ = render(scenario("default"))
    assert find(gpu, "Job", "t-trainer")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


def test_the_ingest_runs_the_cpu_image_whatever_the_workers_use():
    values = {**scenario("ingest"), "image": {"repository": "registry.example.com/trainer", "tag": "custom-gpu"}}
    [ingest] = find(render(values)[0], "Job", "t-trainer-ingest")["spec"]["template"]["spec"]["containers"]
    assert ingest["image"] == "registry.example.com/trainer:0.1.0-cpu"
    values["ingest"] = {**values["ingest"], "image": {"repository": "mirror.example.com/ingest", "tag": "2"}}
    [ingest] = find(render(values)[0], "Job", "t-trainer-ingest")["spec"]["template"]["spec"]["containers"]
    assert ingest["image"] == "mirror.example.com/ingest:2"


SCHEDULING = {
    "kueue": {"queueName": "team-a"}, "schedulerName": "volcano", "priorityClassName": "training",
    "imagePullSecrets": [{"name": "regcred"}],
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"},
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"team": "a"}}}],
}


def test_scheduling_values_reach_both_jobs_and_their_pods():
    values = {**scenario("monitoring"), **SCHEDULING}
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    objects, notes = render(values)
    validate_strictly(objects)
    trainer, ingest = find(objects, "Job", "t-trainer"), find(objects, "Job", "t-trainer-ingest")
    for job in (trainer, ingest):
        # Kueue reads the queue from the Job's own labels and admits a suspended Job by resuming it.
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
        pod = job["spec"]["template"]["spec"]
        assert (pod["schedulerName"], pod["priorityClassName"]) == ("volcano", "training")
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    # Volcano's PodGroup of the training Job takes every worker or none; the ingest pods start one by one.
    assert trainer["metadata"]["annotations"] == {"scheduling.volcano.sh/group-min-member": "2"}
    assert "annotations" not in ingest["metadata"]
    assert "topologySpreadConstraints" not in ingest["spec"]["template"]["spec"]
    zone, host = trainer["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {k: v for k, v in zone.items() if k != "labelSelector"} == SCHEDULING["topologySpreadConstraints"][0]
    assert host == SCHEDULING["topologySpreadConstraints"][1]   # an explicit selector is kept as it is
    # Without a selector the constraint counts this Job's workers: not the ingest, not another release's.
    assert selects(zone["labelSelector"], running_pod(objects, "t-trainer", 1)["labels"])
    other = {**running_pod(objects, "t-trainer")["labels"], "app.kubernetes.io/instance": "u"}
    for pod in (running_pod(objects, "t-trainer-ingest")["labels"], other):
        assert not selects(zone["labelSelector"], pod)
    assert "LocalQueue team-a" in notes and "kubectl -n ml get workloads.kueue.x-k8s.io" in notes


def test_scheduling_is_off_by_default():
    objects, notes = render({**scenario("monitoring"), "schedulerName": "default-scheduler"})
    for job in (o for o in objects if o["kind"] == "Job"):
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"] and "suspend" not in job["spec"]
        assert "annotations" not in job["metadata"]   # the Volcano annotation only with Volcano
        assert not {"topologySpreadConstraints", "imagePullSecrets"} & job["spec"]["template"]["spec"].keys()
    assert "LocalQueue" not in notes
    default, _ = render(scenario("default"))
    assert "schedulerName" not in find(default, "Job", "t-trainer")["spec"]["template"]["spec"]


def test_schema_rejects_wrong_scheduling_values():
    with helm.Chart.load(CHART) as chart:
        good = {**scenario("default"), **SCHEDULING}
        chart.validate_schema(good)
        spread = SCHEDULING["topologySpreadConstraints"][0]
        for bad in ({"schedulerName": 1}, {"priorityClassName": ["training"]}, {"kueue": "team-a"},
                    {"kueue": {"queueName": "team a"}}, {"kueue": {"queue": "team-a"}},
                    {"imagePullSecrets": ["regcred"]}, {"imagePullSecrets": [{"nam": "regcred"}]},
                    {"topologySpreadConstraints": spread},
                    {"topologySpreadConstraints": [{k: v for k, v in spread.items() if k != "whenUnsatisfiable"}]},
                    {"topologySpreadConstraints": [{**spread, "maxSkew": "1"}]},
                    {"topologySpreadConstraints": [{**spread, "whenUnsatisfiable": "Never"}]},
                    {"ingest": {"image": "imagenet-k8s-trainer:0.1.0-cpu"}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema({**good, **bad})


@pytest.mark.parametrize(("resources", "missing"), [
    ({}, "no cpu and no memory"), ({"requests": {"cpu": "8"}}, "no memory"), ({"limits": {"memory": "64Gi"}}, "no cpu"),
    ({"requests": {"cpu": "8", "memory": "48Gi"}}, None), ({"limits": {"cpu": "8", "memory": "48Gi"}}, None)])
def test_notes_warn_about_gpu_workers_without_cpu_or_memory_requests(resources, missing):
    _, notes = render({**scenario("default"), "resources": resources})
    warnings = [line for line in notes.splitlines() if line.startswith("WARNING")]
    if missing is None:   # a limit alone is also the request
        assert warnings == []
    else:
        assert warnings == [f"WARNING: the GPU workers request {missing} (resources.requests): the scheduler may put "
                            "them where"]
    # CPU workers and an ingest-only release: no GPUs to feed.
    for values in ({**scenario("default"), "gpusPerWorker": 0}, scenario("ingest")):
        assert "WARNING" not in render({**values, "resources": resources})[1]


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_secure_by_default_and_secrets_only_by_reference(values):
    values = yaml.safe_load(values.read_text())
    objects, _ = render(values)
    [account] = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    assert not [o for o in objects if o["kind"] == "Secret"]
    for pod in pod_templates(objects):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {"/tmp", "/dev/shm"} <= {m["mountPath"] for m in container["volumeMounts"]}
            for var in container.get("env", []):
                if re.search(r"KEY|SECRET|TOKEN|PASSWORD", var["name"]):
                    assert "value" not in var, var
            credentials = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
                           if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
            expected = {name: {"name": SECRET, "key": name} for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
            assert credentials == (expected if values.get("s3", {}).get("existingSecret") else {})
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not re.search(r"AWS_|secret_?access", json.dumps(config_map["data"]), re.IGNORECASE)


def test_ingest_release_splits_the_plan_over_an_indexed_job_then_finalizes():
    objects, notes = render(scenario("ingest"))
    assert not [o for o in objects if o["kind"] in ("Service", "PodMonitor")]
    job = find(objects, "Job", "t-trainer-ingest")
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Job"] == ["t-trainer-ingest"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 8
    [container] = spec["template"]["spec"]["containers"]
    assert container["args"] == ["--input=/raw/ilsvrc2012", "--output=s3://datasets/imagenet", "--num-workers=8",
                                 "--worker-index=$(JOB_COMPLETION_INDEX)", "--processes=8", "--finalize-if-last",
                                 "--metrics-port=9400", "--metrics-linger=75", "--resize=320", "--shard-bytes=500M"]
    assert container["command"] == ["python", "-m", "ingest.shard"]
    assert {"name": "raw", "mountPath": "/raw", "readOnly": True} in container["volumeMounts"]
    assert "kubectl -n ml wait --for=condition=complete job/t-trainer-ingest" in notes


def test_ingest_pods_serve_their_final_metrics_for_the_linger():
    """A pod that ends takes its /metrics along: the last shards' counts stay scrapeable for
    metrics.lingerSeconds (2-3 of the PodMonitor's 30 s scrapes by default), only when metrics are served."""
    def args(values: dict) -> list[str]:
        [container] = find(render(values)[0], "Job", "t-trainer-ingest")["spec"]["template"]["spec"]["containers"]
        return container["args"]

    values = scenario("ingest")
    assert "--metrics-linger=75" in args(values)
    assert "--metrics-linger=20.5" in args({**values, "metrics": {"lingerSeconds": 20.5}})
    for metrics in ({"lingerSeconds": 0}, {"enabled": False}):
        assert not [a for a in args({**values, "metrics": metrics}) if a.startswith("--metrics-linger")]
    with helm.Chart.load(CHART) as chart:
        for bad in (-1, "75s"):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema({**values, "metrics": {"lingerSeconds": bad}})


def test_training_in_the_same_release_waits_for_the_ingests_manifest():
    objects, notes = render(scenario("monitoring"))
    pod = find(objects, "Job", "t-trainer")["spec"]["template"]
    [wait] = pod["spec"]["initContainers"]
    assert wait["command"] == ["python", "-m", "ingest.wait"]
    assert wait["args"] == ["s3://datasets/tiny-imagenet", "--job=t-trainer-ingest", "--namespace=ml"]
    assert "wait-for-data" in notes
    # It alone gets an API token, and may only get the ingest Job (it gives up once that has failed).
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert [m["mountPath"] for c in containers(pod) for m in c["volumeMounts"] if m["mountPath"] == token] == [token]
    assert {"name": "ingest-status-token", "mountPath": token, "readOnly": True} in wait["volumeMounts"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    role, binding = (find(objects, kind, "t-trainer-wait-for-data") for kind in ("Role", "RoleBinding"))
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": ["t-trainer-ingest"],
                              "verbs": ["get"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = pod["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ml"}]
    alone, _ = render(scenario("default"))
    assert "initContainers" not in find(alone, "Job", "t-trainer")["spec"]["template"]["spec"]
    for other in (alone, render(scenario("ingest"))[0]):   # no training, or no ingest: nothing to read
        assert not [o for o in other if o["kind"] in ("Role", "RoleBinding")]


def test_monitoring_objects_select_the_pods_and_carry_deploy_files():
    objects, notes = render(scenario("monitoring"))
    for name, component in (("t-trainer", "trainer"), ("t-trainer-ingest", "ingest")):
        monitor = find(objects, "PodMonitor", name)
        assert monitor["metadata"]["labels"]["release"] == "monitoring" and monitor["metadata"]["labels"]["team"] == "ml"
        pod = find(objects, "Job", name)["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == component
        declared = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert {e["port"] for e in endpoints} <= declared
        assert all(e["relabelings"] == [{"targetLabel": "job", "replacement": name}] for e in endpoints)
    assert len(find(objects, "PodMonitor", "t-trainer")["spec"]["podMetricsEndpoints"]) == 2  # one per GPU

    rule = find(objects, "PrometheusRule", "t-trainer")
    assert rule["metadata"]["labels"]["release"] == "monitoring"
    assert rule["spec"] == release_rules("ml", "t")
    dashboards = find(objects, "ConfigMap", "t-trainer-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert_release_dashboards(dashboards, "ml", "t")
    assert '"Trainer (ml/t)" with job = t-trainer, "Ingest (ml/t)" with job = t-trainer-ingest' in notes

    annotations = find(objects, "Job", "t-trainer")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics"}
    quiet, _ = render({**scenario("default"), "metrics": {"annotations": False}})
    assert "annotations" not in find(quiet, "Job", "t-trainer")["spec"]["template"]["metadata"]


def test_packaged_chart_holds_the_deploy_dashboards_and_rules(tmp_path):
    """files/ links to deploy/ (one source of truth); `helm package` stores the files themselves."""
    assert (CHART / "files" / "dashboards").resolve() == DASHBOARDS and (CHART / "files" / "rules.yml").resolve() == RULES
    archive = helm.package(CHART, destination=tmp_path)
    objects, _ = render(scenario("monitoring"), chart=archive)
    assert_release_dashboards(find(objects, "ConfigMap", "t-trainer-dashboards"), "ml", "t")
    assert find(objects, "PrometheusRule", "t-trainer")["spec"] == release_rules("ml", "t")


def test_notes_tell_how_to_follow_the_run():
    _, notes = render(scenario("default"))
    assert "kubectl -n ml logs -f -l job-name=t-trainer,batch.kubernetes.io/job-completion-index=0" in notes
    assert "port-forward" in notes and "localhost:9400/metrics" in notes
    assert "s3://runs/model2/results.json" in notes


# --- NetworkPolicy: who may connect to the pods, by the Kubernetes semantics of the rendered policies. ---

NAMESPACE = {"kubernetes.io/metadata.name": "ml"}   # the release's namespace, labelled as Kubernetes does
PROMETHEUS = {"labels": {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus"},
              "namespace": {"kubernetes.io/metadata.name": "monitoring"}}
STRANGER = {"labels": {"app": "notebook"}, "namespace": NAMESPACE}
GLOO_PORT = 45123   # Gloo and NCCL listen on random ports


def selects(selector: dict, labels: dict) -> bool:
    """A label selector: every matchLabels pair and matchExpressions term holds; {} selects all."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    holds = {"In": lambda key, values: labels.get(key) in values,
             "NotIn": lambda key, values: labels.get(key) not in values,
             "Exists": lambda key, values: key in labels, "DoesNotExist": lambda key, values: key not in labels}
    return all(holds[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def admits(objects: list[dict], pod: dict, peer: dict, port: int) -> bool:
    """Whether the rendered NetworkPolicies (installed in namespace ml) let `peer` open a TCP connection to
    `pod` on `port`. A pod that no policy selects admits everything; rules of the policies that select it
    add up. Peers are pods ({"labels", "namespace": its labels}): ipBlock peers never match here."""
    def peer_matches(rule: dict) -> bool:
        if "ipBlock" in rule:
            return False
        in_namespace = (selects(rule["namespaceSelector"], peer["namespace"]) if "namespaceSelector" in rule
                        else peer["namespace"] == NAMESPACE)
        return in_namespace and selects(rule.get("podSelector", {}), peer["labels"])

    def port_matches(entry: dict) -> bool:
        assert isinstance(entry.get("port", 0), int), entry   # named ports are not modelled
        first = entry.get("port", port)
        return entry.get("protocol", "TCP") == "TCP" and first <= port <= entry.get("endPort", first)

    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"]) and pod["namespace"] == NAMESPACE
                and selects(o["spec"]["podSelector"], pod["labels"])]
    return not policies or any(
        (not rule.get("from") or any(peer_matches(p) for p in rule["from"]))
        and (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
        for policy in policies for rule in policy.get("ingress", []))


def running_pod(objects: list[dict], job_name: str, index: int = 0) -> dict:
    """Pod `index` of a rendered Job: its template's labels and those the Job controller adds."""
    labels = find(objects, "Job", job_name)["spec"]["template"]["metadata"]["labels"]
    return {"labels": {**labels, "job-name": job_name, "batch.kubernetes.io/job-name": job_name,
                       "batch.kubernetes.io/job-completion-index": str(index)}, "namespace": NAMESPACE}


def validate_strictly(objects: list[dict]) -> None:
    version = kubernetes_validate.utils.latest_version()
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRDS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_network_policies_admit_only_the_jobs_own_pods_and_the_metrics_scrapers():
    # Ingest and 2 pods x 2 GPUs in one release; metricsFrom: kube-prometheus-stack's Prometheus in monitoring.
    objects, _ = render(scenario("monitoring"))
    validate_strictly(objects)
    trainer_policy, ingest_policy = find(objects, "NetworkPolicy", "t-trainer"), find(objects, "NetworkPolicy", "t-trainer-ingest")
    trainer, peer, ingest = (running_pod(objects, "t-trainer", 0), running_pod(objects, "t-trainer", 1),
                             running_pod(objects, "t-trainer-ingest"))
    assert selects(trainer_policy["spec"]["podSelector"], trainer["labels"])
    assert not selects(trainer_policy["spec"]["podSelector"], ingest["labels"])
    assert selects(ingest_policy["spec"]["podSelector"], ingest["labels"])
    # Only ingress is restricted: egress (object storage, DNS) stays open.
    assert trainer_policy["spec"]["policyTypes"] == ingest_policy["spec"]["policyTypes"] == ["Ingress"]

    [container] = find(objects, "Job", "t-trainer")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics = [port for name, port in ports.items() if name.startswith("metrics-")]
    assert ports["rendezvous"] == 29500 and metrics == [9400, 9401]
    for port in (ports["rendezvous"], GLOO_PORT, *metrics):   # the job's own pods: every port, both ways
        assert admits(objects, trainer, peer, port) and admits(objects, peer, trainer, port), port
    other_release = {"labels": {**trainer["labels"], "app.kubernetes.io/instance": "u", "job-name": "u-trainer"},
                     "namespace": NAMESPACE}
    for outsider in (ingest, STRANGER, other_release, PROMETHEUS):
        for port in (ports["rendezvous"], GLOO_PORT):
            assert not admits(objects, trainer, outsider, port), (outsider, port)
    for port in metrics:
        assert admits(objects, trainer, PROMETHEUS, port) and not admits(objects, trainer, STRANGER, port)
    assert not admits(objects, trainer, PROMETHEUS, 9402)   # not a metrics port with 2 processes per pod

    # The ingest pods serve only their metrics, to the same scrapers.
    assert admits(objects, ingest, PROMETHEUS, 9400)
    for outsider, port in ((STRANGER, 9400), (trainer, 9400), (running_pod(objects, "t-trainer-ingest", 1), GLOO_PORT)):
        assert not admits(objects, ingest, outsider, port), (outsider, port)


def test_network_policies_by_default_and_switched_off():
    objects, _ = render(scenario("default"))
    trainer = running_pod(objects, "t-trainer")
    # metricsFrom empty: the metrics port from anywhere (Prometheus runs in another namespace), nothing else.
    anywhere = {"labels": {"app": "scraper"}, "namespace": {"kubernetes.io/metadata.name": "elsewhere"}}
    assert admits(objects, trainer, anywhere, 9400)
    assert not admits(objects, trainer, anywhere, 29500) and not admits(objects, trainer, STRANGER, GLOO_PORT)

    quiet, _ = render({**scenario("monitoring"), "metrics": {"enabled": False}})
    validate_strictly(quiet)
    assert not admits(quiet, running_pod(quiet, "t-trainer"), PROMETHEUS, 9400)
    assert admits(quiet, running_pod(quiet, "t-trainer"), running_pod(quiet, "t-trainer", 1), 29500)
    assert not admits(quiet, running_pod(quiet, "t-trainer-ingest"), PROMETHEUS, 9400)

    off, _ = render({**scenario("monitoring"), "networkPolicy": {"enabled": False}})
    assert not [o for o in off if o["kind"] == "NetworkPolicy"]
    assert admits(off, running_pod(off, "t-trainer"), STRANGER, 29500)


# --- The rendered commands, run as local processes: the chart's command lines are the ones that work. ---

def kubelet_env(container: dict, index: int, secrets: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with this pod's completion index."""
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = annotations[re.fullmatch(r"metadata\.annotations\['(.+)'\]", path).group(1)]
    return env


def start_pod(container: dict, index: int, secrets: dict, log: Path, rewrite=lambda argv: argv) -> subprocess.Popen:
    """One pod's container as a local process: its command and args expanded as the kubelet does ($(VAR) from its
    env, $$ to $). The image's `python` is this virtualenv's; AWS settings come only from the chart, not from this
    process."""
    env = kubelet_env(container, index, secrets)
    argv = [re.sub(r"\$\$|\$\((\w+)\)", lambda m: env[m.group(1)] if m.group(1) else "$", a)
            for a in container["command"] + container.get("args", [])]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    inherited["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with log.open("w") as out:
        return subprocess.Popen(rewrite(argv), env={**inherited, **env}, cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path) -> str:
    process.wait(timeout=600)
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def own_metrics_port(argv: list[str]) -> list[str]:
    """On Kubernetes every pod has its own network namespace; on one machine each needs its own port."""
    return [f"--metrics-port={free_port()}" if a.startswith("--metrics-port=") else a for a in argv]


def test_rendered_jobs_ingest_then_train_on_local_processes(train_shards, s3_bucket, s3_endpoint, tmp_path):
    import s3fs

    values = {
        "workers": 2, "gpusPerWorker": 0,
        "data": {"url": f"s3://{s3_bucket}/shards"}, "output": {"url": f"s3://{s3_bucket}/run"},
        "train": {"preset": "seed-model1-aug", "epochs": 5, "batchSize": 32, "extraArgs": ["--lr=0.002"]},
        "s3": {"existingSecret": SECRET, "endpoint": s3_endpoint, "region": S3_TEST_ENV["AWS_DEFAULT_REGION"]},
        "rendezvous": {"port": free_port()}, "networkInterface": "lo",
        "ingest": {"enabled": True, "input": str(train_shards.parent / "tiny"), "workers": 2, "processes": 1,
                   "extraArgs": ["--shard-size=100"]},
        "metrics": {"lingerSeconds": 0.5},   # the rendered flag, for less than the default 75 s
    }
    secrets = {SECRET: {k: S3_TEST_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    objects, _ = render(values)
    fs = s3fs.S3FileSystem()

    # Ingest pods one after the other: pod 0 cannot finalize yet and leaves it to pod 1, the last to finish.
    [ingest] = find(objects, "Job", "t-trainer-ingest")["spec"]["template"]["spec"]["containers"]
    first = finish(start_pod(ingest, 0, secrets, tmp_path / "ingest-0.log", own_metrics_port), tmp_path / "ingest-0.log")
    assert "(not finalized yet: 5 shard(s) not committed" in first
    assert "the last worker to finish writes manifest.json" in first
    assert not fs.exists(f"{s3_bucket}/shards/manifest.json")
    finish(start_pod(ingest, 1, secrets, tmp_path / "ingest-1.log", own_metrics_port), tmp_path / "ingest-1.log")
    assert fs.exists(f"{s3_bucket}/shards/manifest.json")
    run_cli("ingest.verify", f"s3://{s3_bucket}/shards", check=True)

    pod = find(objects, "Job", "t-trainer")["spec"]["template"]["spec"]
    [wait] = pod["initContainers"]
    finish(start_pod(wait, 0, secrets, tmp_path / "wait.log"), tmp_path / "wait.log")

    # Pod names resolve only in the cluster: here pod 0, the rendezvous server, is 127.0.0.1.
    def local(argv: list[str]) -> list[str]:
        at = argv.index("--")
        return own_metrics_port(argv[:at] + ["--rendezvous-addr=127.0.0.1"] + argv[at:])

    [trainer] = pod["containers"]
    logs = [tmp_path / f"trainer-{i}.log" for i in range(2)]
    late = start_pod(trainer, 1, secrets, logs[1], local)  # pods start in any order: pod 1 waits for pod 0
    deadline = time.monotonic() + 120
    while "waiting for the rendezvous server" not in logs[1].read_text():
        assert late.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
        time.sleep(0.2)
    first = start_pod(trainer, 0, secrets, logs[0], local)
    finish(first, logs[0])
    finish(late, logs[1])

    results = json.loads(fs.cat_file(f"{s3_bucket}/run/results.json"))
    assert results["workers"] == 2 and results["epochs_run"] == 5 and results["model"] == "model1"
    # 10 classes: chance is 0.1 top-1 and 0.5 top-5.
    assert results["val_top1"] > 0.25 and results["val_top5"] > 0.75
    assert fs.exists(f"{s3_bucket}/run/model.keras")


def connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` holds an established TCP connection to port `port` (IPv4)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            sockets.add(re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)).group(1))
        except (OSError, AttributeError):
            continue
    rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return any(row[3] == "01" and int(row[2].rsplit(":", 1)[1], 16) == port and row[9] in sockets for row in rows)


def test_ingest_pod_stops_on_sigterm_and_its_rerun_completes_the_dataset(train_shards, tmp_path, monkeypatch):
    """Kubernetes stops a pod with SIGTERM to the container's PID 1, here python itself, which ignores
    signals it does not handle. Pod 1 of 2 gets it while stuck on a stalled object store (its moto_server
    stopped with SIGSTOP): it must exit at once with its documented code, not wait for the grace period's
    SIGKILL. (Here python is not PID 1: without a handler it would die of the signal, -15, not exit 143.)
    The replacement pod, the same command, then completes the dataset and writes the manifest."""
    import boto3

    from ingest.errors import EXIT_TERMINATED

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    secrets = {SECRET: {k: S3_TEST_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    values = {
        "train": {"enabled": False}, "data": {"url": "s3://data/shards"},
        "s3": {"existingSecret": SECRET, "endpoint": endpoint, "region": S3_TEST_ENV["AWS_DEFAULT_REGION"]},
        "ingest": {"enabled": True, "input": str(train_shards.parent / "tiny"), "workers": 2, "processes": 1,
                   "extraArgs": ["--shard-size=100"]},
        "metrics": {"lingerSeconds": 0.5},   # the rendered flag, for less than the default 75 s
    }
    [ingest] = find(render(values)[0], "Job", "t-trainer-ingest")["spec"]["template"]["spec"]["containers"]
    logs = [tmp_path / name for name in ("ingest-0.log", "ingest-1.log", "ingest-1-again.log")]
    with local_server(moto, f"{endpoint}/moto-api/") as store:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
                          region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket="data")
        finish(start_pod(ingest, 0, secrets, logs[0], own_metrics_port), logs[0])   # leaves finalizing to pod 1

        store.send_signal(signal.SIGSTOP)
        pod = start_pod(ingest, 1, secrets, logs[1], own_metrics_port)
        try:
            deadline = time.monotonic() + 120
            while not connected_to(pod.pid, port):   # until python is waiting on the object store
                assert pod.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
                time.sleep(0.1)
            pod.send_signal(signal.SIGTERM)
            pod.wait(timeout=60)
        finally:
            if pod.poll() is None:
                pod.kill()
            store.send_signal(signal.SIGCONT)
        assert pod.returncode == EXIT_TERMINATED, (pod.returncode, logs[1].read_text()[-3000:])
        assert "terminated (SIGTERM): committed shards are kept" in logs[1].read_text()

        finish(start_pod(ingest, 1, secrets, logs[2], own_metrics_port), logs[2])
        manifest = json.loads(s3.get_object(Bucket="data", Key="shards/manifest.json")["Body"].read())
        assert {split: info["samples"] for split, info in manifest["splits"].items()} == {"train": 1000, "val": 100}
        use_s3_endpoint(monkeypatch, endpoint)
        run_cli("ingest.verify", "s3://data/shards", check=True)


def test_wait_for_data_stops_on_sigterm(tmp_path):
    """The init container's python is PID 1, which ignores SIGTERM it does not handle: ingest.wait handles it.
    (Here python is not PID 1: without the handler it would die of the signal, -15, not exit 143.)"""
    values = {**scenario("default"), "data": {"url": str(tmp_path / "not-yet")}, "ingest": {"enabled": True, "input": "/raw"}}
    [wait] = find(render(values)[0], "Job", "t-trainer")["spec"]["template"]["spec"]["initContainers"]
    log = tmp_path / "wait.log"
    process = start_pod(wait, 0, {}, log)
    deadline = time.monotonic() + 120
    while "manifest.json (the ingest writes it last)" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_as_the_charts_user_and_build_from_this_tree(dockerfile):
    """No Docker engine here: what can be checked without building. The image's user is the chart's
    runAsUser (runAsNonRoot checks it is not root) and every file it copies exists."""
    text = (REPO / "deploy" / "docker" / dockerfile).read_text()
    context = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert re.findall(r"^USER (.+)$", text, re.M) == [f"{context['runAsUser']}:{context['runAsGroup']}"]
    sources = [s for line in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M) for s in line.split()]
    assert "deploy/horovod/build-wheel.sh" in sources and "trainer" in sources
    assert all((REPO / s).exists() for s in sources), sources


# --- Several releases in one cluster: no object, dashboard or rule group of one is another's. ---

RELEASES = [("ml", "a"), ("ml", "b"), ("other", "a"),   # the same release name in another namespace
            # Names that fill the readable part of a dashboard uid alike (Grafana allows 40 characters).
            ("ml", "resnet50-imagenet-sweep-lr-0-1"), ("ml", "resnet50-imagenet-sweep-lr-0-2")]


def release_rules(namespace: str, release: str) -> dict:
    """deploy/prometheus/rules.yml as a release's PrometheusRule carries it: each group named after the release."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["name"] = f"{namespace}/{release}/{group['name']}"
    return rules


def assert_release_dashboards(configmap: dict, namespace: str, release: str) -> dict[str, str]:
    """The ConfigMap carries every deploy/ dashboard as JSON, changed only in its uid and title, which name the
    release; returns their titles by uid."""
    sources = {f"{namespace}_{release}_{p.name}": json.loads(p.read_text()) for p in DASHBOARDS.glob("*.json")}
    assert configmap["data"].keys() == sources.keys()
    titles = {}
    for key, source in sources.items():
        dashboard = json.loads(configmap["data"][key])
        uid, title = dashboard.pop("uid"), dashboard.pop("title")
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid), uid   # Grafana's limit, and safe in its URLs
        assert title == f"{source.pop('title')} ({namespace}/{release})"
        del source["uid"]
        assert dashboard == source   # every panel, query and variable as in deploy/
        titles[uid] = title
    return titles


def test_releases_in_one_cluster_collide_nowhere():
    """Helm refuses to create an object another release owns. Grafana keeps one dashboard per uid (and per title
    in a folder). Grafana's sidecar writes each data key of the labelled ConfigMaps to a file of that name, in
    one folder for all the namespaces it watches, and deletes the file when that ConfigMap goes (helm
    uninstall): a key two releases shared would be one file, and uninstalling either would take both's."""
    rendered = {release: render(scenario("monitoring"), name=release[1], namespace=release[0])[0]
                for release in RELEASES}
    uids, titles, keys, groups = [], [], [], []
    for (namespace, release), objects in rendered.items():
        [configmap] = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
        [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
        dashboards = assert_release_dashboards(configmap, namespace, release)
        uids += dashboards
        titles += dashboards.values()
        keys += configmap["data"]
        assert rule["spec"] == release_rules(namespace, release)
        groups += [group["name"] for group in rule["spec"]["groups"]]
    for names in (uids, titles, keys, groups):
        assert len(names) >= 2 * len(RELEASES) and len(set(names)) == len(names), names

    for (namespace, x), (other_namespace, y) in itertools.permutations(rendered, 2):
        if namespace != other_namespace:
            continue
        objects, others = rendered[namespace, x], rendered[namespace, y]
        assert not {(o["kind"], o["metadata"]["name"]) for o in objects} & {
            (o["kind"], o["metadata"]["name"]) for o in others}, (x, y)
        # Neither release's Service nor PodMonitors (which label the series with their job) take the other's pods.
        selectors = [{"matchLabels": o["spec"]["selector"]} for o in objects if o["kind"] == "Service"]
        selectors += [o["spec"]["selector"] for o in objects if o["kind"] == "PodMonitor"]
        pods = [running_pod(others, o["metadata"]["name"]) for o in others if o["kind"] == "Job"]
        assert len(selectors) == 3 and len(pods) == 2
        assert not any(selects(selector, pod["labels"]) for selector in selectors for pod in pods), (x, y)


def test_a_dashboard_that_is_not_json_fails_the_render(tmp_path):
    """Helm's fromJson turns a parse error into a map holding it: the chart must fail instead."""
    chart = tmp_path / "trainer"
    shutil.copytree(CHART, chart)   # files/ links resolved: a copy to break
    (chart / "files" / "dashboards" / "trainer.json").write_text('{"title": "Trainer",')
    with pytest.raises(helm.HelmRenderError, match="trainer.json is not JSON"):
        render(scenario("monitoring"), chart=chart)


def test_ports_past_65535_or_shared_by_two_servers_fail_the_install():
    """Rank r serves metrics on metrics.port + r: the last port must exist, and none may be the rendezvous port
    (the schema checks each value alone; the chart's ports helper checks them together)."""
    overflow = "metrics.port 65530 + local rank runs to 65537 with 8 processes per pod (gpusPerWorker 8): above 65535"
    clash = "rendezvous.port {} is also a metrics port: metrics.port {} + local rank, {} to {}"
    cases = [({"gpusPerWorker": 8, "metrics": {"port": 65530}}, overflow),
             ({"metrics": {"port": 29500}}, clash.format(29500, 29500, 29500, 29500)),
             ({"gpusPerWorker": 8, "rendezvous": {"port": 9407}}, clash.format(9407, 9400, 9400, 9407)),
             ({"gpusPerWorker": 4, "metrics": {"port": 29497}}, clash.format(29500, 29497, 29497, 29500))]
    for base in (scenario("default"), scenario("sweep")):
        for bad, message in cases:
            with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
                render({**base, **bad})
    # The edges: the last metrics port 65535, the rendezvous just past the metrics ports, or no metrics ports.
    for good in ({"gpusPerWorker": 8, "metrics": {"port": 65528}}, {"gpusPerWorker": 8, "rendezvous": {"port": 9408}},
                 {"gpusPerWorker": 8, "metrics": {"enabled": False, "port": 65530}},
                 {"gpusPerWorker": 8, "metrics": {"port": 29492}}):
        objects, _ = render({**scenario("default"), **good})
        [ports] = [[p["containerPort"] for p in c["ports"]] for pod in pod_templates(objects) for c in containers(pod)
                   if c["name"] == "trainer"]
        assert len(set(ports)) == len(ports) and max(ports) <= 65535, (good, ports)

"""deploy/docker without a Docker engine: build.sh run against a stub `docker` that records its calls (the tags
must be the images the chart runs by default), the Dockerfiles' layer order and their CUDA and NCCL pins."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO
from .test_chart import find, render, scenario

DOCKER = REPO / "deploy" / "docker"
BUILD = DOCKER / "build.sh"
BASH = shutil.which("bash")
STUB = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "buildkit": os.environ.get("DOCKER_BUILDKIT")}}) + "\\n")
sys.exit(int(os.environ.get("STUB_DOCKER_EXIT", "0")))
"""


def build_sh(tmp_path: Path, *args: str, docker: bool = True, exit_code: int = 0):
    """Runs build.sh from another directory with a PATH of sed and (or not) the stub docker: its result, and the
    calls docker received."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker-calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "sed").exists():
        (bin_dir / "sed").symlink_to(shutil.which("sed"))
    stub = bin_dir / "docker"
    if docker:
        stub.write_text(STUB.format(python=sys.executable, log=str(log)))
        stub.chmod(0o755)
    else:
        stub.unlink(missing_ok=True)
    env = {"PATH": str(bin_dir), "STUB_DOCKER_EXIT": str(exit_code)}
    result = subprocess.run([BASH, str(BUILD), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls


def chart_images(repository: str | None) -> dict[str, str]:
    """The images the chart's default values run: GPU workers, CPU workers, the ingest."""
    image = {"image": {"repository": repository}} if repository else {}
    gpu, _ = render({**scenario("default"), **image})
    cpu, _ = render({**scenario("default"), **image, "gpusPerWorker": 0})
    ingest, _ = render({**scenario("ingest"), **image})

    def first(objects, name):
        return find(objects, "Job", name)["spec"]["template"]["spec"]["containers"][0]["image"]

    return {"gpu": first(gpu, "t-trainer"), "cpu": first(cpu, "t-trainer"), "ingest": first(ingest, "t-trainer-ingest")}


@pytest.mark.parametrize("repository", [None, "registry.example.com:5000/ml/imagenet-k8s-trainer"])
def test_build_sh_tags_the_images_the_chart_runs(tmp_path, repository):
    result, calls = build_sh(tmp_path, *(["--repository", repository] if repository else []))
    assert result.returncode == 0, result.stderr
    images = chart_images(repository)
    assert images["cpu"] == images["ingest"]
    # Both built from the repository root (the Dockerfiles COPY paths from there) with BuildKit (RUN --mount).
    assert [c["argv"] for c in calls] == [["build", "-f", "deploy/docker/Dockerfile", "-t", images["gpu"], "."],
                                          ["build", "-f", "deploy/docker/Dockerfile.cpu", "-t", images["cpu"], "."]]
    assert all(c["cwd"] == str(REPO) and c["buildkit"] == "1" for c in calls)
    assert result.stdout.splitlines()[-2:] == [f"build.sh: {images['gpu']}", f"build.sh: {images['cpu']}"]


def test_build_sh_pushes_after_building_and_passes_build_arguments(tmp_path):
    repository = "registry.example.com/imagenet-k8s-trainer"
    result, calls = build_sh(tmp_path, "--repository", repository, "--version", "0.2.0-rc1", "--push", "--",
                             "--build-arg", "TF_VERSION=2.21.0")
    assert result.returncode == 0, result.stderr
    gpu, cpu = f"{repository}:0.2.0-rc1-gpu", f"{repository}:0.2.0-rc1-cpu"
    assert [c["argv"] for c in calls] == [
        ["build", "-f", "deploy/docker/Dockerfile", "-t", gpu, "--build-arg", "TF_VERSION=2.21.0", "."],
        ["build", "-f", "deploy/docker/Dockerfile.cpu", "-t", cpu, "--build-arg", "TF_VERSION=2.21.0", "."],
        ["push", gpu], ["push", cpu]]
    result, calls = build_sh(tmp_path, "--only", "cpu")
    assert [c["argv"][:5] for c in calls] == [["build", "-f", "deploy/docker/Dockerfile.cpu", "-t",
                                               chart_images(None)["cpu"]]]


def test_build_sh_help(tmp_path):
    result, calls = build_sh(tmp_path, "--help")
    assert result.returncode == 0 and calls == [] and result.stderr == ""
    assert result.stdout.startswith("usage: deploy/docker/build.sh") and "imagenet-k8s-trainer" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown argument --bogus"), (["--repository"], "--repository needs a value"),
    (["--version", ""], "--version needs a value"), (["--only", "tpu"], "--only tpu: gpu or cpu"),
    (["--repository", "Registry.example.com/X"], "a lowercase image repository without a tag"),
    (["--repository", "registry.example.com/x:1.0"], "a lowercase image repository without a tag"),
    (["--version", "-rc1"], "--version -rc1: letters, digits"), (["--version", "1 0"], "--version 1 0: letters")])
def test_build_sh_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    result, calls = build_sh(tmp_path, *args)
    assert result.returncode == 2 and calls == [] and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("build.sh: ") and message in line, line


def test_build_sh_without_docker_or_with_a_failing_build(tmp_path):
    result, _ = build_sh(tmp_path, docker=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["build.sh: docker not found on PATH: install Docker with BuildKit, or "
                                          "build where it is"]
    result, calls = build_sh(tmp_path, "--push", exit_code=3)
    assert result.returncode == 3 and [c["argv"][0] for c in calls] == ["build"]   # no second build, no push
    assert result.stderr.splitlines() == ["build.sh: docker build of imagenet-k8s-trainer:0.1.0-gpu from "
                                          "deploy/docker/Dockerfile failed (exit 3)"]


def instructions(dockerfile: Path) -> list[str]:
    """The final stage's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last:]


@pytest.mark.parametrize(("dockerfile", "extras"), [("Dockerfile", "gpu s3 gcs k8s"), ("Dockerfile.cpu", "cpu s3 gcs k8s")])
def test_dependencies_are_installed_before_the_source_is_copied(dockerfile, extras):
    """A code change must not reinstall TensorFlow: the layer installing the dependencies sees pyproject.toml
    only, and the project itself is installed after the source, without its dependencies."""
    stage = instructions(DOCKER / dockerfile)
    [deps] = [i for i, line in enumerate(stage) if line.startswith("RUN") and "-r /build/requirements.txt" in line]
    assert f"requirements.py pyproject.toml {extras} > /build/requirements.txt" in stage[deps]
    assert "horovod-*.whl" in stage[deps]
    copies = [(i, line.split()[1:-1]) for i, line in enumerate(stage) if line.startswith("COPY ")]
    before = {source for i, sources in copies if i < deps for source in sources}
    assert before == {"pyproject.toml", "deploy/docker/requirements.py"}
    after = {source for i, sources in copies if i > deps for source in sources}
    assert {"ingest", "trainer", "README.md"} <= after
    [project] = [i for i, line in enumerate(stage) if line.startswith("RUN") and "pip install" in line and i > deps]
    assert stage[project] == "RUN pip install --no-cache-dir --no-deps ."
    assert project > max(i for i, _ in copies)


def test_requirements_script_lists_the_dependencies_and_the_extras(tmp_path):
    script = DOCKER / "requirements.py"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), "gpu", "s3"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    extras = project["optional-dependencies"]
    assert listed == project["dependencies"] + extras["gpu"] + extras["s3"]
    bad = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), "cuda"], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("requirements.py: no extra cuda in ") and "gpu" in bad.stderr


def test_nccl_is_pinned_to_the_cuda_tensorflow_was_built_with():
    text = (DOCKER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    for package in ("libnccl2", "libnccl-dev"):
        assert f'"{package}=${{NCCL_VERSION}}+cuda${{CUDA_VERSION}}"' in text
    assert re.fullmatch(r"\d+\.\d+", args["CUDA_VERSION"]) and re.fullmatch(r"[\d.]+-\d+", args["NCCL_VERSION"])
    # The CUDA of the base image is the one of TensorFlow's and-cuda wheels: checkable where this TensorFlow runs.
    try:
        installed = importlib.metadata.version("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != args["TF_VERSION"]:
        pytest.skip(f"the image's TensorFlow {args['TF_VERSION']} is not installed here ({installed})")
    [runtime] = [r for r in importlib.metadata.requires("tensorflow-cpu") if r.startswith("nvidia-cuda-runtime-cu12")]
    assert re.search(r">=\s*(\d+\.\d+)\.", runtime).group(1) == args["CUDA_VERSION"], runtime


def test_build_sh_is_executable():
    assert os.access(BUILD, os.X_OK)

"""Ingest under storage faults and crashes: transient S3 errors retried (through bench.faultproxy
in front of moto_server), permanent ones a one-line error naming the object, SIGKILL at chosen
moments then a rerun giving exactly the planned dataset, overlapping runs of one plan.

Kill points come from this file, not from hooks in the product: run as
`python -m tests.test_ingest_faults POINT TARGET ARGS...`, it patches one function so that the
ingest (ARGS, `--processes 1`) dies with SIGKILL, or pauses, when it reaches TARGET, then runs
the shard CLI's main in that same process.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from bench.faultproxy import Rule, fault_proxy
from bench.servers import free_port
from ingest import synth
from ingest.errors import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_INPUT, EXIT_OUTPUT

from .conftest import REPO
from .helpers import read_dataset
from .helpers import shard_bytes as _shard_bytes

SHARD_SIZE = "5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    synth.generate(str(path), classes=4, train_per_class=8, val_per_class=3, size=32, seed=4, quirks=True)
    return path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Every object of a clean run: what any crashed-then-resumed or faulted run must give."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    result = run("ingest.shard", *shard_args(tiny, out))
    assert result.returncode == 0, result.stderr
    return shard_bytes(str(out))


def shard_args(source, out, *extra) -> list[str]:
    return ["--input", str(source), "--output", str(out), "--shard-size", SHARD_SIZE, "--processes", "1", *extra]


def command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(module, *args), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failed run must print, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def same_dataset(url: str, reference_url: str) -> None:
    """Same samples (keys, labels, bytes) and manifest; the input's location may differ."""
    manifest, samples = read_dataset(url)
    expected_manifest, expected_samples = read_dataset(reference_url)
    assert samples == expected_samples
    for m in (manifest, expected_manifest):
        m["source"].pop("input")
    assert manifest == expected_manifest


def visible_objects_are_complete(url: str, reference: dict[str, bytes]) -> dict[str, bytes]:
    """Every object under a final name equals the clean run's; temporary files aside (readers
    never see them: they go by the manifest and index). Returns the final objects."""
    final = {name: data for name, data in shard_bytes(url).items() if ".tmp-" not in name}
    for name, data in final.items():
        assert data == reference[name], name
    return final


def shard_bytes(url: str) -> dict[str, bytes]:
    """helpers.shard_bytes, fresh: other processes wrote there since this one last listed it."""
    fsspec.core.url_to_fs(url)[0].invalidate_cache()
    return _shard_bytes(url)


def s3_url(bucket: str, path: str) -> str:
    return f"s3://{bucket}/{path}"


# --------------------------------------------------------------------------- storage faults


def test_the_fault_proxy_follows_its_rules_deterministically(s3_endpoint):
    import urllib.error
    import urllib.request

    def statuses(seed: int, rules: list[Rule]) -> list[int]:
        with fault_proxy(s3_endpoint, rules, seed=seed) as proxy:
            answers = []
            for _ in range(12):
                try:
                    answers.append(urllib.request.urlopen(f"{proxy.url}/moto-api/", timeout=10).status)
                except urllib.error.HTTPError as exc:
                    answers.append(exc.code)
            assert proxy.requests == 12 and proxy.injected["slow_down"] == answers.count(503)
        return answers

    assert statuses(0, [Rule("slow_down", "GET", "moto-api", skip=2, count=3)]) == [200] * 2 + [503] * 3 + [200] * 7
    assert statuses(0, [Rule("slow_down", "PUT", "moto-api", count=None)]) == [200] * 12
    first = statuses(1, [Rule("slow_down", path="moto-api", count=None, probability=0.5)])
    assert 0 < first.count(503) < 12
    assert statuses(1, [Rule("slow_down", path="moto-api", count=None, probability=0.5)]) == first


@pytest.fixture
def s3_input(tiny, s3_bucket):
    """The tiny input uploaded to the bucket, so that reading it goes through S3 too."""
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3_bucket}")
    fs.put(str(tiny), f"{s3_bucket}/in", recursive=True)
    return s3_url(s3_bucket, "in")


def test_transient_faults_on_every_kind_of_request_are_retried(tiny, s3_input, s3_bucket, s3_endpoint, tmp_path):
    local = tmp_path / "local"
    assert run("ingest.shard", *shard_args(s3_input, local)).returncode == 0
    rules = [
        Rule("internal_error", "GET", r"list-type=2"),                       # a listing
        Rule("service_unavailable", "GET", r"/out/_index/plan\.json"),       # the plan, before it exists
        Rule("truncate", "GET", r"/in/train/.+\.JPEG$", count=2),            # input reads, cut mid-body
        Rule("slow_down", "GET", r"/in/val/images/.+\.JPEG$"),
        Rule("close_before", "GET", r"/in/val/val_annotations\.txt$"),
        Rule("internal_error", "PUT", r"/out/train-000001\.tar$"),           # shards
        Rule("close_before", "PUT", r"/out/train-000002\.tar$"),
        Rule("close_after", "PUT", r"/out/val-000000\.tar$"),                # applied, answer lost
        Rule("service_unavailable", "PUT", r"/out/_index/train-000003\.tar\.json$"),   # a commit
        Rule("slow_down", "PUT", r"/out/manifest\.json$", count=2),          # the dataset's commit
    ]
    out = s3_url(s3_bucket, "out")
    with fault_proxy(s3_endpoint, rules) as proxy:
        result = run("ingest.shard", *shard_args(s3_input, out, "--processes", "2"),
                     env={"AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == 0, result.stderr
    assert [rule.fired for rule in rules] == [rule.count for rule in rules]   # every fault was met
    same_dataset(out, str(local))
    assert run("ingest.verify", out).stdout.startswith("ok:")


def test_a_permanent_error_names_the_object_and_keeps_what_was_committed(tiny, reference, s3_bucket, s3_endpoint):
    out = s3_url(s3_bucket, "denied")
    rules = [Rule("access_denied", "PUT", r"/denied/train-000002\.tar$", count=None)]
    with fault_proxy(s3_endpoint, rules) as proxy:
        result = run("ingest.shard", *shard_args(tiny, out, "--processes", "2"), env={"AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == EXIT_OUTPUT
    line = error_line(result)
    assert f"{out}/train-000002.tar: write refused, permission denied (AccessDenied" in line
    assert rules[0].fired == 1    # a permanent error is not retried
    committed = {name for name in visible_objects_are_complete(out, reference) if name.endswith(".tar.json")}
    assert committed and "_index/train-000002.tar.json" not in committed
    rerun = run("ingest.shard", *shard_args(tiny, out))
    assert rerun.returncode == 0 and f"{len(committed)} already committed" in rerun.stdout
    assert shard_bytes(out) == reference


# A connection closed before the response reads as either botocore error, depending on whether the
# request had been sent when the proxy closed it.
@pytest.mark.parametrize("fault, reason", [("internal_error", "InternalError"),
                                           ("close_before", "(EndpointConnectionError|ConnectionClosedError)")])
def test_storage_failing_beyond_the_retry_budget_is_a_clean_error(fault, reason, tiny, reference, s3_bucket,
                                                                  s3_endpoint):
    out = s3_url(s3_bucket, "failing")
    rules = [Rule(fault, "PUT", r"/failing/_index/train-000001\.tar\.json$", count=None)]
    with fault_proxy(s3_endpoint, rules) as proxy:
        # AWS_MAX_ATTEMPTS is botocore's budget (default 5 attempts); 2 keeps the test short.
        result = run("ingest.shard", *shard_args(tiny, out), env={"AWS_ENDPOINT_URL": proxy.url,
                                                                  "AWS_MAX_ATTEMPTS": "2"})
    assert result.returncode == EXIT_FAILED
    line = error_line(result)
    assert re.search(rf"{re.escape(out)}/_index/train-000001\.tar\.json: write failed after retries \({reason}", line)
    assert "rerun to resume" in line
    assert proxy.injected[fault] >= 2
    visible_objects_are_complete(out, reference)
    assert run("ingest.shard", *shard_args(tiny, out)).returncode == 0
    assert shard_bytes(out) == reference


def test_an_input_object_that_cannot_be_read_stops_the_run(s3_input, s3_bucket, s3_endpoint):
    rules = [Rule("access_denied", "GET", r"/in/train/.+\.JPEG$", skip=3, count=None)]
    out = s3_url(s3_bucket, "out")
    with fault_proxy(s3_endpoint, rules) as proxy:
        result = run("ingest.shard", *shard_args(s3_input, out), env={"AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == EXIT_INPUT
    assert f"error: {s3_input}/train/" in error_line(result) and "read refused, permission denied" in result.stderr


def test_an_unreachable_endpoint_is_a_clean_error(tiny, s3_bucket):
    result = run("ingest.shard", *shard_args(tiny, s3_url(s3_bucket, "x")),
                 env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode == EXIT_OUTPUT
    assert "is not writable: EndpointConnectionError" in error_line(result)


def test_verify_retries_and_names_a_shard_it_cannot_read(tiny, s3_bucket, s3_endpoint):
    out = s3_url(s3_bucket, "v")
    assert run("ingest.shard", *shard_args(tiny, out)).returncode == 0
    rules = [Rule("slow_down", "GET", r"/v/train-000000\.tar"), Rule("truncate", "GET", r"/v/train-000001\.tar"),
             Rule("access_denied", "GET", r"/v/val-000000\.tar", count=None)]
    with fault_proxy(s3_endpoint, rules) as proxy:
        result = run("ingest.verify", out, env={"AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == EXIT_INCOMPLETE
    problems = result.stdout.splitlines()[:-1]
    assert len(problems) == 1 and problems[0].startswith("val-000000.tar: cannot be read (AccessDenied")
    assert [rule.fired for rule in rules[:2]] == [1, 1]


# --------------------------------------------------------------------------- crashes


def crash_command(point: str, target: str, *ingest_args) -> list[str]:
    return command("tests.test_ingest_faults", point, target, *ingest_args)


def crash(point: str, target: str, *ingest_args, env: dict | None = None) -> None:
    result = subprocess.run(crash_command(point, target, *ingest_args), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr


def temporary_files(out: Path, name: str) -> list[bytes]:
    return [p.read_bytes() for p in out.glob(f"{name}.tmp-*")]


@pytest.mark.parametrize("point, target", [
    ("mid-write", "train-000002.tar"),        # the shard's temporary file half written
    ("before-index", "train-000002.tar"),     # the shard complete, its index entry not written
    ("before-manifest", "manifest.json"),     # every shard committed, finalize about to write
    ("mid-write", "manifest.json"),           # the manifest's temporary file half written
])
def test_sigkill_on_local_disk_then_rerun_gives_the_planned_dataset(point, target, tiny, reference, tmp_path):
    out = tmp_path / "out"
    crash(point, target, *shard_args(tiny, out))
    final = visible_objects_are_complete(str(out), reference)
    assert "manifest.json" not in final
    if point == "mid-write":
        assert target not in final
        partial = temporary_files(out, target)
        assert len(partial) == 1 and 0 < len(partial[0]) < len(reference[target])
    if point == "before-index":
        assert target in final and f"_index/{target}.json" not in final
    if target == "manifest.json":
        assert set(final) == set(reference) - {"manifest.json"}
    rerun = run("ingest.shard", *shard_args(tiny, out))
    assert rerun.returncode == 0, rerun.stderr
    assert shard_bytes(str(out)) == reference    # also: no temporary file left


@pytest.mark.parametrize("point, target", [
    ("stall", "train-000002.tar"),            # killed while the shard's PUT is in flight
    ("before-index", "train-000002.tar"),
    ("before-manifest", "manifest.json"),
    ("stall", "manifest.json"),               # killed while the manifest's PUT is in flight
])
def test_sigkill_through_s3_then_rerun_gives_the_planned_dataset(point, target, tiny, reference, s3_bucket,
                                                                 s3_endpoint):
    out = s3_url(s3_bucket, "crash")
    if point == "stall":
        stall_and_kill(s3_endpoint, rf"/{target.replace('.', '[.]')}$", shard_args(tiny, out))
    else:
        crash(point, target, *shard_args(tiny, out))
    final = visible_objects_are_complete(out, reference)
    assert "manifest.json" not in final and (point != "stall" or target not in final)
    assert not [name for name in shard_bytes(out) if ".tmp-" in name]   # object stores get no temporary names
    if point == "before-index":
        assert target in final and f"_index/{target}.json" not in final
    rerun = run("ingest.shard", *shard_args(tiny, out))
    assert rerun.returncode == 0, rerun.stderr
    assert shard_bytes(out) == reference


def stall_and_kill(s3_endpoint: str, path: str, ingest_args: list[str], method: str = "PUT", skip: int = 0) -> None:
    """SIGKILL the ingest while the proxy holds a request for `path` (a regex; of a PUT, half of the
    body received), the `skip`+1-th such request."""
    rules = [Rule("stall", method, path, skip=skip)]
    with fault_proxy(s3_endpoint, rules) as proxy:
        process = subprocess.Popen(command("ingest.shard", *ingest_args), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "AWS_ENDPOINT_URL": proxy.url})
        try:
            proxy.wait_for("stall")
        finally:
            process.kill()
            process.wait(60)


def test_an_overlapping_run_of_the_same_plan_finishes_unharmed(tiny, reference, tmp_path):
    """Run A pauses with a shard in its temporary file; run B does the whole job meanwhile, and its
    finalize removes A's temporary file as a crash leftover. A then completes all the same."""
    out, signals = tmp_path / "out", tmp_path / "signals"
    signals.mkdir()
    first = subprocess.Popen(crash_command("pause-before-rename", "train-000002.tar", *shard_args(tiny, out)),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "FAULT_SIGNALS": str(signals)})
    try:
        deadline = time.monotonic() + 120
        while not (signals / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        assert temporary_files(out, "train-000002.tar")
        second = run("ingest.shard", *shard_args(tiny, out))
        assert second.returncode == 0, second.stderr
        assert not temporary_files(out, "train-000002.tar")     # B's finalize removed A's file
        (signals / "release").touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert shard_bytes(str(out)) == reference


def test_two_workers_with_the_same_index_at_once_through_s3(tiny, reference, s3_bucket):
    out = s3_url(s3_bucket, "twice")
    worker = ["--num-workers", "2", "--worker-index", "0"]
    pair = [subprocess.Popen(command("ingest.shard", *shard_args(tiny, out, *worker)), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in pair:
        assert process.wait(300) == 0, process.stderr.read()
        process.stderr.close()
    assert run("ingest.shard", *shard_args(tiny, out, "--num-workers", "2", "--worker-index", "1")).returncode == 0
    assert run("ingest.shard", "--output", out, "--finalize").returncode == 0
    assert shard_bytes(out) == reference
    assert run("ingest.verify", out).stdout.startswith("ok:")


# --------------------------------------------------------------------------- crashes, input in a bucket


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """A small ILSVRC2012 download with quirks (its images are byte ranges of the tars)."""
    path = tmp_path_factory.mktemp("ilsvrc") / "ilsvrc"
    synth.generate(str(path), layout="imagenet", classes=4, train_per_class=8, val_per_class=3, size=32, seed=4,
                   quirks=True)
    return path


@pytest.fixture
def ilsvrc_s3(ilsvrc, s3_bucket):
    """(the download uploaded to the bucket, every object of a clean run from there)."""
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3_bucket}")
    fs.put(f"{ilsvrc}/", f"{s3_bucket}/raw", recursive=True)
    raw, clean = s3_url(s3_bucket, "raw"), s3_url(s3_bucket, "clean")
    assert run("ingest.shard", *shard_args(raw, clean)).returncode == 0
    return raw, shard_bytes(clean)


@pytest.mark.parametrize("point, target", [
    ("stall-read", "ILSVRC2012_img_train.tar"),   # killed while a ranged read of the train tar is in flight
    ("stall", "train-000002.tar"),
    ("before-index", "train-000002.tar"),
    ("before-manifest", "manifest.json"),
])
def test_sigkill_with_the_input_in_a_bucket_then_rerun_gives_the_planned_dataset(point, target, ilsvrc_s3, s3_bucket,
                                                                                 s3_endpoint):
    raw, reference = ilsvrc_s3
    out = s3_url(s3_bucket, "clean")   # the same input and output names as the clean run: the same bytes
    s3fs_rm(out)
    if point == "stall-read":
        # The 10th read of the train tar: listing is done (it reads it in a few requests) and shards are being built.
        stall_and_kill(s3_endpoint, rf"/raw/{target}$", shard_args(raw, out), method="GET", skip=9)
    elif point == "stall":
        stall_and_kill(s3_endpoint, rf"/{target.replace('.', '[.]')}$", shard_args(raw, out))
    else:
        crash(point, target, *shard_args(raw, out))
    final = visible_objects_are_complete(out, reference)
    assert "manifest.json" not in final
    if point == "stall-read":   # killed while building, some shards committed already
        assert [name for name in final if name.startswith("_index/train-")], sorted(final)
    rerun = run("ingest.shard", *shard_args(raw, out))
    assert rerun.returncode == 0, rerun.stderr
    assert shard_bytes(out) == reference


def test_pods_with_the_input_in_a_bucket_one_killed_and_replaced(ilsvrc_s3, s3_bucket, s3_endpoint):
    """The chart's ingest: two pods with --finalize-if-last, input and output in the bucket; pod 0 is killed
    mid-read, pod 1 finishes (and leaves the manifest to pod 0), pod 0's replacement finishes and finalizes."""
    raw, reference = ilsvrc_s3
    out = s3_url(s3_bucket, "clean")
    s3fs_rm(out)
    pod = [shard_args(raw, out, "--num-workers", "2", "--worker-index", str(i), "--finalize-if-last") for i in (0, 1)]
    stall_and_kill(s3_endpoint, r"/raw/ILSVRC2012_img_train\.tar$", pod[0], method="GET", skip=9)
    assert [name for name in shard_bytes(out) if name.startswith("_index/train-")]
    second = run("ingest.shard", *pod[1])
    assert second.returncode == 0 and "(not finalized yet: " in second.stdout, second.stderr
    replaced = run("ingest.shard", *pod[0])
    assert replaced.returncode == 0 and "(not finalized" not in replaced.stdout, replaced.stderr
    assert shard_bytes(out) == reference
    assert run("ingest.verify", out).stdout.startswith("ok:")


def s3fs_rm(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)
    fs.invalidate_cache()


# --------------------------------------------------------------------------- the crash wrapper


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_before(module, name: str, suffix: str) -> None:
    """Replace module.name(fs, path, payload) by one that dies before writing a path ending in `suffix`."""
    real = getattr(module, name)

    def die_first(fs, path, payload):
        if path.endswith(suffix):
            _kill_self()
        return real(fs, path, payload)
    setattr(module, name, die_first)


def _install(point: str, target: str) -> None:
    """Patch the one function where `point` happens for the object named `target`."""
    from fsspec.implementations.local import LocalFileSystem

    from ingest import manifest, writer

    if point == "mid-write":                 # half of the bytes in the temporary file, then death
        pipe_file = LocalFileSystem.pipe_file

        def half_then_die(self, path, value, *args, **kwargs):
            if os.path.basename(path).startswith(f"{target}.tmp-"):
                pipe_file(self, path, value[:len(value) // 2], *args, **kwargs)
                _kill_self()
            return pipe_file(self, path, value, *args, **kwargs)
        LocalFileSystem.pipe_file = half_then_die
    elif point == "before-index":            # the shard object written, its index entry not
        _die_before(writer, "write_json", f"/{target}.json")
    elif point == "before-manifest":         # finalize checked every shard, about to write
        _die_before(manifest, "write_atomic", f"/{target}")
    elif point == "pause-before-rename":     # the temporary file complete, not yet renamed
        mv = LocalFileSystem.mv
        signals = Path(os.environ["FAULT_SIGNALS"])

        def pause_then_rename(self, path1, path2, *args, **kwargs):
            if os.path.basename(path2) == target:
                (signals / "paused").touch()
                while not (signals / "release").exists():
                    time.sleep(0.01)
            return mv(self, path1, path2, *args, **kwargs)
        LocalFileSystem.mv = pause_then_rename
    else:
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    from ingest import shard

    _install(sys.argv[1], sys.argv[2])
    sys.exit(shard.main(sys.argv[3:]))

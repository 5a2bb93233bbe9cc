"""The shard CLI's behaviour: resume, idempotence, multi-worker split, caps, errors, verify."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest import synth
from ingest.config import IngestConfig
from ingest.errors import EXIT_INCOMPLETE, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_TERMINATED, EXIT_USAGE

from ingest.shard import run
from ingest.storage import Location
from ingest.verify import verify

from .conftest import REPO, run_cli
from .helpers import read_dataset, shard_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small TinyImageNet-layout input with quirks, shared by the tests of this module."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    truth = synth.generate(str(path), classes=6, train_per_class=10, val_per_class=4, size=32, seed=5, quirks=True)
    return truth, path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The dataset a clean single run produces, to compare every other way of running against."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    run_cli("ingest.shard", "--input", tiny[1], "--output", out, "--shard-size", "4", "--processes", "1", check=True)
    return shard_bytes(str(out))


def ingest(source, out, *extra, check=True):
    return run_cli("ingest.shard", "--input", source, "--output", out, "--shard-size", "4", *extra, check=check)


def mtimes(path) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}


def test_parallel_run_equals_single_process_run(tiny, reference, tmp_path):
    ingest(tiny[1], tmp_path / "out", "--processes", "2")
    assert shard_bytes(str(tmp_path / "out")) == reference


def test_rerun_of_finished_job_rewrites_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    before = mtimes(out)
    second = ingest(tiny[1], out, "--processes", "1")
    assert mtimes(out) == before
    assert "0 shards written" in second.stdout and "already committed" in second.stdout


PAUSE_AFTER_COMMITS = 3


def start_and_interrupt(source, out, processes: str, sig: signal.Signals) -> subprocess.Popen:
    """Start an ingest that stops to wait once its third shard is committed (see the end of this file)
    and send `sig` to its process group then: the run can neither end first nor be signalled early."""
    paused = out.parent / "paused"
    process = subprocess.Popen([sys.executable, "-m", "tests.test_ingest_shard", str(paused), "--input", str(source),
                                "--output", str(out), "--shard-size", "4", "--processes", processes], cwd=REPO,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120   # only a hang's bound: the pause comes after 3 shards of 4 small images
    while not paused.exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.01)
    assert len([p for p in os.listdir(out / "_index") if p.endswith(".tar.json")]) >= PAUSE_AFTER_COMMITS
    os.killpg(process.pid, sig)
    process.communicate(timeout=60)
    assert not (out / "manifest.json").exists()
    return process


def test_ctrl_c_exits_cleanly_and_rerun_completes(tiny, reference, tmp_path):
    out = tmp_path / "out"
    process = start_and_interrupt(tiny[1], out, "2", signal.SIGINT)
    assert process.returncode == EXIT_INTERRUPTED
    ingest(tiny[1], out, "--processes", "2")
    assert shard_bytes(str(out)) == reference


def test_resume_after_sigkill_gives_the_same_dataset(tiny, reference, tmp_path):
    out = tmp_path / "out"
    start_and_interrupt(tiny[1], out, "1", signal.SIGKILL)
    index = out / "_index"
    # Also the other crash windows: a shard written but its index entry not, and a half-written temp file.
    entries = sorted(p for p in os.listdir(index) if p.endswith(".tar.json"))
    os.remove(index / entries[0])
    (out / "train-000099.tar.tmp-dead").write_bytes(b"partial")
    result = ingest(tiny[1], out, "--processes", "1")
    assert "already committed" in result.stdout
    assert shard_bytes(str(out)) == reference


def test_a_damaged_committed_shard_is_redone(tiny, reference, tmp_path):
    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    os.remove(out / "manifest.json")
    ingest(tiny[1], out, "--processes", "1")
    assert shard_bytes(str(out)) == reference


def test_workers_split_the_plan_then_finalize(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    for worker in (0, 2):
        result = ingest(tiny[1], out, "--num-workers", "3", "--worker-index", str(worker), "--processes", "1")
        assert "not finalized" in result.stdout
    early = run_cli("ingest.shard", "--output", out, "--finalize")
    assert early.returncode == EXIT_INCOMPLETE and "not committed yet" in early.stderr
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # how a Kubernetes Indexed Job names the pod
    ingest(tiny[1], out, "--num-workers", "3", "--processes", "1")
    done = run_cli("ingest.shard", "--output", out, "--finalize", check=True)
    assert "train:" in done.stdout
    assert shard_bytes(str(out)) == reference


def test_shards_mix_classes_and_seed_changes_the_mix(tiny, tmp_path):
    ingest(tiny[1], tmp_path / "a", "--processes", "1", "--shard-size", "12")
    ingest(tiny[1], tmp_path / "b", "--processes", "1", "--shard-size", "12", "--seed", "7")
    manifest, splits = read_dataset(str(tmp_path / "a"))
    first = manifest["splits"]["train"]["shards"][0]["name"]
    with open(tmp_path / "a" / first, "rb") as handle:
        import tarfile
        labels = {int(t.extractfile(m).read()) for t in [tarfile.open(fileobj=io.BytesIO(handle.read()))]
                  for m in t if m.name.endswith(".cls")}
    assert len(labels) >= 3
    assert shard_bytes(str(tmp_path / "a"))[first] != shard_bytes(str(tmp_path / "b"))[first]
    assert read_dataset(str(tmp_path / "b"))[1] == splits


def test_byte_cap_cuts_shards(tiny, tmp_path):
    ingest(tiny[1], tmp_path / "out", "--processes", "1", "--shard-size", "1000", "--shard-bytes", "16K")
    manifest, _ = read_dataset(str(tmp_path / "out"))
    shards = manifest["splits"]["train"]["shards"]
    # The cap is planned from source sizes; the few re-encoded quirk images may grow a little.
    assert len(shards) > 1 and all(s["bytes"] <= 16 * 1024 + 4096 for s in shards)


def test_resize_caps_the_shorter_side(tiny, tmp_path):
    ingest(tiny[1], tmp_path / "out", "--processes", "1", "--resize", "16")
    manifest, splits = read_dataset(str(tmp_path / "out"))
    for sample in splits["train"].values():
        assert min(sample["json"]["width"], sample["json"]["height"]) == 16
    assert manifest["reencoded"]["resized"] > 0
    box = next(s["json"]["boxes"][0] for s in splits["train"].values() if "boxes" in s["json"])
    assert max(box) <= 16


def test_stock_webdataset_reads_the_shards(tiny, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    manifest, splits = read_dataset(str(out))
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls", "json")
    seen = {}
    for key, image, label, meta in dataset:
        assert image.shape == (meta["height"], meta["width"], 3)
        seen[key] = label
    assert seen == {k: s["cls"] for k, s in splits["train"].items()}


def test_verify_passes_then_names_each_tampered_shard(tiny, tmp_path):
    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    assert run_cli("ingest.verify", out).returncode == 0
    flipped = bytearray((out / "train-000000.tar").read_bytes())
    flipped[700] ^= 0xFF
    (out / "train-000000.tar").write_bytes(bytes(flipped))
    (out / "train-000001.tar").write_bytes((out / "train-000001.tar").read_bytes()[:-512])
    os.remove(out / "val-000000.tar")
    result = run_cli("ingest.verify", out)
    assert result.returncode == EXIT_INCOMPLETE
    assert "train-000000.tar: sha256" in result.stdout
    assert "train-000001.tar: size" in result.stdout
    assert "val-000000.tar: missing" in result.stdout


def test_verify_catches_a_manifest_that_lies_about_counts(tiny, tmp_path):
    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("ingest.verify", out)
    assert result.returncode == EXIT_INCOMPLETE and "train-000000.tar: 4 samples, manifest says 5" in result.stdout


def assert_clean_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_clean_errors(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(ingest(tmp_path / "nope", out, check=False), EXIT_INPUT, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_error(ingest(tmp_path / "empty", out, check=False), EXIT_INPUT, "no known dataset layout",
                       "wnids.txt", "ILSVRC2012_img_train.tar", "LOC_synset_mapping.txt", "<class>")
    (tmp_path / "file").write_text("x")
    assert_clean_error(ingest(tiny[1], tmp_path / "file" / "out", check=False), EXIT_OUTPUT, str(tmp_path / "file"))
    assert_clean_error(ingest(tiny[1], out, "--shard-size", "0", check=False), EXIT_USAGE, "shard size 0")
    assert_clean_error(ingest(tiny[1], out, "--splits", "train,bogus", check=False), EXIT_INPUT, "bogus")
    ingest(tiny[1], out, "--processes", "1")
    assert_clean_error(ingest(tiny[1], out, "--seed", "9", check=False), EXIT_OUTPUT, "seed 0 -> 9")
    assert_clean_error(run_cli("ingest.verify", tmp_path), EXIT_INPUT, "manifest.json")


def test_val_annotation_with_unknown_wnid_is_an_error(tmp_path):
    path = tmp_path / "tiny"
    synth.generate(str(path), classes=3, train_per_class=2, val_per_class=2, size=32)
    annotations = path / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split("\t")[1], "n99999999")
    annotations.write_text("\n".join(lines) + "\n")
    result = ingest(path, tmp_path / "out", check=False)
    assert_clean_error(result, EXIT_INPUT, "val_annotations.txt", "line 2", "n99999999")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_val_annotation_for_a_missing_file_is_reported(tmp_path):
    path = tmp_path / "tiny"
    truth = synth.generate(str(path), classes=3, train_per_class=2, val_per_class=2, size=32)
    os.remove(path / "val" / "images" / "val_0.JPEG")
    ingest(path, tmp_path / "out", "--processes", "1")
    manifest, splits = read_dataset(str(tmp_path / "out"))
    assert {"split": "val", "source": "val/images/val_0.JPEG", "reason": "missing_file"}.items() <= \
        next(r for r in manifest["rejected"] if r["reason"] == "missing_file").items()
    assert len(splits["val"]) == len(truth.splits["val"]) - 1


def test_help_explains_every_flag():
    result = run_cli("ingest.shard", "--help", check=True)
    for flag in ("--input", "--output", "--source", "--shard-size", "--shard-bytes", "--processes", "--num-workers",
                 "--worker-index", "--finalize", "--resize", "--seed", "--splits", "--storage-option",
                 "--metrics-linger", "exit codes"):
        assert flag in result.stdout


def test_file_and_memory_urls_give_the_same_dataset(tiny, reference, tmp_path):
    run_cli("ingest.shard", "--input", tiny[1], "--output", f"file://{tmp_path}/out", "--shard-size", "4",
            "--processes", "1", check=True)
    assert shard_bytes(f"file://{tmp_path}/out") == reference
    # memory:// lives inside one process, so this one runs in-process.
    report = run(IngestConfig(output="memory://ingest-test", input=str(tiny[1]), shard_size=4, processes=1))
    assert report.manifest is not None
    assert shard_bytes("memory://ingest-test") == reference
    checked, problems = verify(Location("memory://ingest-test"))
    assert (checked, problems) == (sum(name.endswith(".tar") for name in reference), [])


def test_a_malformed_box_drops_the_box_not_the_sample(tmp_path):
    path = tmp_path / "tiny"
    truth = synth.generate(str(path), classes=3, train_per_class=2, val_per_class=2, size=32)
    annotations = path / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    name, wnid = lines[0].split("\t")[:2]
    lines[0] = f"{name}\t{wnid}\tnan\t1\tx\t3"
    annotations.write_text("\n".join(lines) + "\n")
    ingest(path, tmp_path / "out", "--processes", "1")
    _, splits = read_dataset(str(tmp_path / "out"))
    assert len(splits["val"]) == len(truth.splits["val"])
    assert "boxes" not in splits["val"][name.split(".")[0]]["json"]


def test_verify_checks_labels_and_tar_structure_behind_a_matching_hash(tiny, tmp_path):
    import hashlib

    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    manifest = json.loads((out / "manifest.json").read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    data = (out / first["name"]).read_bytes()
    cls_at = data.index(b".cls\x00")
    payload_at = (cls_at // 512 + 1) * 512      # the .cls payload follows its header block
    # A one-digit label becomes 9, outside the 6 classes; the second shard is not a tar at all.
    forged = {first["name"]: data[:payload_at] + b"9" + data[payload_at + 1:],
              second["name"]: b"\x01" * second["bytes"]}
    for shard in (first, second):
        (out / shard["name"]).write_bytes(forged[shard["name"]])
        shard["sha256"] = hashlib.sha256(forged[shard["name"]]).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("ingest.verify", out)
    assert result.returncode == EXIT_INCOMPLETE
    assert f"{first['name']}: sample" in result.stdout and "no class index in 0..5" in result.stdout
    assert f"{second['name']}: not a readable tar" in result.stdout


def test_verify_names_an_image_that_is_not_a_whole_jpeg_and_a_wrong_image_size(tiny, tmp_path):
    import hashlib

    from trainer.shards import parse_tar

    out = tmp_path / "out"
    ingest(tiny[1], out, "--processes", "1")
    manifest = json.loads((out / "manifest.json").read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    data = bytearray((out / first["name"]).read_bytes())
    key, spans = sorted(parse_tar(bytes(data)).items())[0]
    start, end = spans["jpg"]
    data[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 4) + b"\xff\xd9"   # no frame, no scan
    (out / first["name"]).write_bytes(data)
    first["sha256"] = hashlib.sha256(data).hexdigest()
    assert second["image_size"] == [32, 32]
    second["image_size"] = [64, 64]                                            # a hand edit that lies
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("ingest.verify", out)
    assert result.returncode == EXIT_INCOMPLETE
    assert f"{first['name']}: sample {key}: its .jpg is not a whole JPEG (corrupt" in result.stdout
    assert f"{second['name']}: sample" in result.stdout and "is 32x32, the manifest's image_size says 64x64" \
        in result.stdout


def pool_workers(parent: int) -> list[int]:
    """The multiprocessing (spawn) children of a process."""
    found = []
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:   # exited meanwhile
            continue
    return found


def start_committing(source, out, args: list[str]) -> tuple[subprocess.Popen, list[int]]:
    """Start an ingest with a pool; return it and its pool workers once shards are being committed."""
    process = subprocess.Popen([sys.executable, "-m", "ingest.shard", "--input", str(source), "--output", str(out),
                                *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers:
        assert time.monotonic() < deadline and process.poll() is None, "the run ended before a worker was found"
        time.sleep(0.002)
        # Committed shards' entries (beside plan.json): at least 4 before the interruption.
        if (out / "_index").is_dir() and len([n for n in os.listdir(out / "_index") if n.endswith(".tar.json")]) >= 4:
            workers = pool_workers(process.pid)
    return process, workers


def test_a_killed_worker_process_fails_the_run_fast(tmp_path):
    source = tmp_path / "tiny"
    synth.generate(str(source), classes=10, train_per_class=300, val_per_class=2, size=32)
    out = tmp_path / "out"
    process, workers = start_committing(source, out, ["--shard-size", "2", "--processes", "2"])
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "a worker process died" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.json").exists()


def test_sigterm_stops_the_run_and_its_pool_at_once_and_a_rerun_completes(tmp_path):
    """What Kubernetes sends a pod's PID 1 (python itself in the chart's ingest pods) on deletion or eviction."""
    source = tmp_path / "tiny"
    synth.generate(str(source), classes=10, train_per_class=300, val_per_class=2, size=32)
    out, args = tmp_path / "out", ["--shard-size", "2", "--processes", "2"]
    process, workers = start_committing(source, out, args)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_TERMINATED, stderr
    assert "terminated (SIGTERM): committed shards are kept" in stderr and "Traceback" not in stderr
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "pool workers left running"
    assert not (out / "manifest.json").exists()
    rerun = run_cli("ingest.shard", "--input", source, "--output", out, *args, check=True)
    assert int(re.search(r"(\d+) already committed", rerun.stdout).group(1)) >= 4
    fresh = tmp_path / "fresh"
    run_cli("ingest.shard", "--input", source, "--output", fresh, *args, check=True)
    assert shard_bytes(str(out)) == shard_bytes(str(fresh))


def test_finalize_if_last_leaves_the_manifest_to_the_last_worker(tiny, reference, tmp_path):
    out = tmp_path / "out"
    workers = [["--num-workers", "3", "--worker-index", str(i), "--finalize-if-last", "--processes", "1"]
               for i in range(3)]
    for worker in workers[:2]:
        result = ingest(tiny[1], out, *worker)
        assert result.returncode == 0 and "(not finalized yet: " in result.stdout
        assert "the last worker to finish writes manifest.json" in result.stdout
        assert not (out / "manifest.json").exists()
    last = ingest(tiny[1], out, *workers[2])
    assert "(not finalized" not in last.stdout and "train: " in last.stdout
    assert shard_bytes(str(out)) == reference
    again = ingest(tiny[1], out, *workers[0])   # a replaced pod that runs again: nothing rewritten
    assert again.returncode == 0 and "0 shards written" in again.stdout
    assert shard_bytes(str(out)) == reference


def test_finalize_if_last_is_a_workers_mode():
    cases = {("--finalize-if-last",): "--input is required",
             ("--input", "y", "--finalize", "--finalize-if-last"): "--finalize and --finalize-if-last exclude each other"}
    for args, message in cases.items():
        result = run_cli("ingest.shard", "--output", "x", *args)
        assert result.returncode == EXIT_USAGE and message in result.stderr.splitlines()[-1]


def test_metrics_served_during_the_run_match_the_manifest(tiny, tmp_path):
    import shutil
    import urllib.request

    from bench.servers import free_port

    source = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny[1], source)
    next((source / "val" / "images").iterdir()).unlink()   # refused while listing: missing_file
    port = free_port()
    report = run(IngestConfig(output=str(tmp_path / "out"), input=str(source), shard_size=4, processes=1,
                              metrics_port=port, pushgateway=f"http://127.0.0.1:{free_port()}"))
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    checked = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=exposition,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    manifest = report.manifest
    assert f'ingest_images_total{{split="train",worker="0"}} {float(manifest["splits"]["train"]["samples"])}' \
        in exposition
    assert f'ingest_shards_committed_total{{worker="0"}} {float(len(report.written))}' in exposition
    for cause, count in manifest["reencoded"].items():
        assert f'ingest_images_reencoded_total{{cause="{cause}",worker="0"}} {float(count)}' in exposition
    shard_rejects = [r for e in report.written for r in e["rejected"]]
    assert shard_rejects and manifest["rejected_by_reason"]["missing_file"] == 1
    for reason, count in manifest["rejected_by_reason"].items():   # listing and shard rejections alike
        assert f'ingest_images_rejected_total{{reason="{reason}",worker="0"}} {float(count)}' in exposition


def test_metrics_linger_serves_the_final_counts_and_sigterm_ends_it_with_success(tiny, tmp_path):
    """On Kubernetes the pod's end takes its /metrics away: the linger keeps the final counts there for
    Prometheus's next scrapes, and a SIGTERM then (the Job deleted) is no failure: exit 0 at once."""
    import urllib.request

    from bench.servers import free_port

    out, port, log = tmp_path / "out", free_port(), tmp_path / "stderr"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "ingest.shard", "--input", str(tiny[1]), "--output", str(out),
                                    "--shard-size", "4", "--processes", "1", "--metrics-port", str(port),
                                    "--metrics-linger", "600"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120   # only a hang's bound: a few shards of small images
        while "(--metrics-linger)" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        shards = sum(len(split["shards"]) for split in json.loads((out / "manifest.json").read_text())["splits"].values())
        assert f'ingest_shards_committed_total{{worker="0"}} {float(shards)}' in exposition
        assert f'ingest_shards_planned{{worker="0"}} {float(shards)}' in exposition
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()   # not the 600 s linger
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in log.read_text() and "terminated" not in log.read_text()


def test_metrics_linger_ends_by_itself_and_needs_a_metrics_port(tiny, tmp_path):
    from bench.servers import free_port

    out = tmp_path / "out"
    assert_clean_error(ingest(tiny[1], out, "--metrics-linger", "5", check=False), EXIT_USAGE,
                       "--metrics-linger needs --metrics-port")
    for value in ("-1", "nan", "inf"):
        assert_clean_error(ingest(tiny[1], out, "--metrics-port", str(free_port()), "--metrics-linger", value,
                                  check=False), EXIT_USAGE, "metrics linger", "must be a number of seconds >= 0")
    assert not out.exists()
    result = ingest(tiny[1], out, "--processes", "1", "--metrics-port", str(free_port()), "--metrics-linger", "0.5")
    assert "serving the final metrics for 0.5 s" in result.stderr and "this run:" in result.stdout


def test_final_counts_are_pushed_to_a_real_pushgateway(tiny, tmp_path):
    import shutil
    import urllib.request

    from bench.servers import free_port, local_server

    port = free_port()
    command = [shutil.which("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with local_server(command, f"http://127.0.0.1:{port}/-/ready"):
        ingest(tiny[1], tmp_path / "out", "--processes", "1", "--pushgateway", f"http://127.0.0.1:{port}",
               "--num-workers", "1", "--worker-index", "0")
        pushed = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    train = float(manifest["splits"]["train"]["samples"])
    assert f'ingest_images_total{{instance="",job="ingest",split="train",worker="0"}} {train:g}' in pushed


if __name__ == "__main__":
    # `python -m tests.test_ingest_shard MARKER ARGS...`: the shard CLI with ARGS, except that its main
    # process creates MARKER and waits for a signal once PAUSE_AFTER_COMMITS shards are committed (with
    # --processes 1 exactly that many; a pool may commit more meanwhile, but the run cannot finish).
    from ingest import shard

    results = shard.ShardRunner.results

    def results_then_pause(self, todo, plan_id):
        for number, entry in enumerate(results(self, todo, plan_id), 1):
            yield entry
            if number == PAUSE_AFTER_COMMITS:
                Path(sys.argv[1]).touch()
                while True:
                    signal.pause()

    shard.ShardRunner.results = results_then_pause
    sys.exit(shard.main(sys.argv[2:]))


@pytest.mark.parametrize("resize", [None, "20"])
def test_a_shard_records_the_image_size_its_images_share(tiny, tmp_path, resize):
    """The trainer skips its per-image size check for a split whose shards all say its model's size."""
    from trainer.shards import parse_tar

    ingest(tiny[1], tmp_path / "out", "--processes", "1", *(["--resize", resize] if resize else []))
    manifest, _ = read_dataset(str(tmp_path / "out"))
    recorded = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = (tmp_path / "out" / shard["name"]).read_bytes()
            sizes = {(meta["height"], meta["width"]) for meta in
                     (json.loads(data[start:end]) for spans in parse_tar(data).values()
                      for start, end in [spans["json"]])}
            assert shard.get("image_size") == (list(sizes.pop()) if len(sizes) == 1 else None)
            recorded.append(shard.get("image_size"))
    assert [32, 32] in recorded if resize is None else [20, 20] in recorded

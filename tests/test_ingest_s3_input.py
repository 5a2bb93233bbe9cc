"""Raw downloads read straight from object storage: every layout from s3:// (moto_server on
127.0.0.1) gives byte for byte the dataset that the same input on local disk gives."""
from __future__ import annotations

import json
import math
import urllib.parse
from collections import Counter

import fsspec
import pytest

from bench.faultproxy import fault_proxy
from ingest import synth

from .conftest import run_cli
from .helpers import shard_bytes

CASES = {
    "imagenet": dict(layout="imagenet"),
    "imagenet-kaggle": dict(layout="imagenet-kaggle"),
    "tinyimagenet": dict(layout="tinyimagenet"),
    "tinyimagenet-zip": dict(layout="tinyimagenet", zip=True),
    "imagefolder": dict(layout="imagefolder"),
}
# Where the dataset records its own input; everything else must be the same bytes.
RECORDS_INPUT = ("manifest.json", "_index/plan.json")


@pytest.fixture(scope="module", params=list(CASES))
def local_run(request, tmp_path_factory):
    """(case, input on local disk, the dataset ingested from it)."""
    base = tmp_path_factory.mktemp(request.param)
    options = CASES[request.param]
    source = base / ("tiny-imagenet-200.zip" if options.get("zip") else "input")
    synth.generate(str(source), classes=4, train_per_class=7, val_per_class=3, size=40, seed=5, quirks=True,
                   **options)
    output = base / "shards"
    run_cli("ingest.shard", "--input", source, "--output", output, "--shard-size", "6", "--processes", "2",
            check=True)
    return request.param, source, output


def upload(source, url: str) -> str:
    """The input as a user uploads it: the same file names under a bucket prefix."""
    fs, root = fsspec.core.url_to_fs(url)
    if source.is_dir():
        fs.put(f"{source}/", root, recursive=True)
        return url
    fs.put_file(str(source), f"{root}/{source.name}")
    return f"{url}/{source.name}"


def without_input(objects: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in objects.items() if name not in RECORDS_INPUT}


def json_without_input(blob: bytes) -> dict:
    document = json.loads(blob)
    document["source"].pop("input")
    return document


def test_every_layout_from_s3_gives_the_local_dataset(local_run, s3_bucket):
    case, source, local = local_run
    raw = upload(source, f"s3://{s3_bucket}/raw/{case}")
    out = f"s3://{s3_bucket}/shards/{case}"
    result = run_cli("ingest.shard", "--input", raw, "--output", out, "--shard-size", "6", "--processes", "2")
    assert result.returncode == 0, result.stderr
    remote, expected = shard_bytes(out), shard_bytes(str(local))
    assert without_input(remote) == without_input(expected)
    for name in RECORDS_INPUT:
        assert json_without_input(remote[name]) == json_without_input(expected[name]), name
    assert run_cli("ingest.verify", out).stdout.startswith("ok:")


# --------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """An ILSVRC2012 download of 21,000 small images (20 classes), on local disk and in a bucket."""
    path = tmp_path_factory.mktemp("ilsvrc") / "ilsvrc"
    synth.generate(str(path), layout="imagenet", classes=20, train_per_class=1000, val_per_class=50, size=16,
                   seed=6, grayscale_fraction=0.0)
    return path


def input_requests(proxy, prefix: str) -> Counter:
    """The proxy's requests for objects under `prefix`, by method (listings counted as LIST)."""
    counts = Counter()
    for method, target, _ in proxy.log:
        target = urllib.parse.unquote(target)
        if target.startswith(f"/{prefix}") or f"prefix={prefix.split('/', 1)[1]}" in target:
            counts["LIST" if "list-type" in target else method] += 1
    return counts


def test_the_train_tar_is_read_in_runs_not_a_request_per_image(ilsvrc, s3_bucket, s3_endpoint, tmp_path):
    from ingest.plan import RUNS_PER_SHARD
    from ingest.reader import LIST_CHUNK_REMOTE

    raw = upload(ilsvrc, f"s3://{s3_bucket}/ilsvrc")
    local = tmp_path / "local"
    run_cli("ingest.shard", "--input", ilsvrc, "--output", local, "--processes", "2", check=True)
    out = f"s3://{s3_bucket}/ilsvrc-shards"
    with fault_proxy(s3_endpoint) as proxy:
        result = run_cli("ingest.shard", "--input", raw, "--output", out, "--processes", "2",
                         env={"AWS_ENDPOINT_URL": proxy.url})
        assert result.returncode == 0, result.stderr
    assert without_input(shard_bytes(out)) == without_input(shard_bytes(str(local)))

    manifest = json.loads((local / "manifest.json").read_text())
    images = sum(info["samples"] for info in manifest["splits"].values())
    shards = sum(len(info["shards"]) for info in manifest["splits"].values())
    sizes = {path.name: path.stat().st_size for path in ilsvrc.iterdir()}
    classes = len(manifest["classes"])
    # Listing: a HEAD and a small read per archive, one read per class archive header, and the
    # class archives and the val tar walked in reads of LIST_CHUNK_REMOTE.
    listing = 3 * len(sizes) + classes + classes + math.ceil(sizes["ILSVRC2012_img_val.tar"] / LIST_CHUNK_REMOTE) \
        + math.ceil(sizes["ILSVRC2012_img_train.tar"] / LIST_CHUNK_REMOTE)
    # Building: one request per run (1/RUNS_PER_SHARD of a shard here: the images are small),
    # a run cut in two where a shard ends.
    building = RUNS_PER_SHARD * shards + shards
    requests = input_requests(proxy, f"{s3_bucket}/ilsvrc/")
    assert images >= 20_000
    assert requests["GET"] + requests["HEAD"] + requests["LIST"] <= listing + building, requests
    assert requests["GET"] < images / 20

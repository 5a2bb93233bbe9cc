"""Raw downloads read straight from object storage: every layout from s3:// (moto_server on
127.0.0.1) gives byte for byte the dataset that the same input on local disk gives."""
from __future__ import annotations

import fsspec
import pytest

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
    import json

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

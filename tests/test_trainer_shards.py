"""trainer.shards: a shard's sample index, kept for the bytes the manifest pins, and damage in a shard."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import io
import tarfile

import pytest

from ingest.storage import Location
from trainer import shards as shards_module
from trainer.shards import MAX_CONSECUTIVE_SKIPS, ShardSource


def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples.items():
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _source(directory, data: bytes, pinned: bool, name: str = "s.tar") -> ShardSource:
    (directory / name).write_bytes(data)
    expected = {name: (len(data), hashlib.sha256(data).hexdigest())} if pinned else {}
    return ShardSource(Location(str(directory)), expected=expected, classes=3)


def _read(source: ShardSource, part: int, parts: int, name: str = "s.tar") -> list[tuple[bytes, int]]:
    data, offsets, lengths, labels = source.samples(name, part, parts)
    return [(data[o:o + n], int(label)) for o, n, label in zip(offsets, lengths, labels)]


def _samples(count: int = 9, seed: int = 0) -> dict[str, dict[str, bytes]]:
    return {f"k{i:02d}": {"jpg": bytes([i + seed]) * (i + 1), "cls": str((i + seed) % 3).encode()}
            for i in range(count)}


def test_a_pinned_shard_is_indexed_once_and_reads_the_same_every_epoch(tmp_path, monkeypatch):
    samples = _samples()
    del samples["k04"]["cls"]   # incomplete: skipped, and counted on every read
    source = _source(tmp_path, _tar(samples), pinned=True)
    complete = [(s["jpg"], int(s["cls"])) for _, s in sorted(samples.items()) if "cls" in s]
    every = [(s["jpg"], int(s["cls"])) if "cls" in s else None for _, s in sorted(samples.items())]
    first = [_read(source, part, 3) for part in range(3)]
    assert first == [[s for s in every[part::3] if s] for part in range(3)]
    assert sorted(sum(first, [])) == sorted(complete)

    def indexed_again(data):
        raise AssertionError("the tar was indexed again")

    monkeypatch.setattr(shards_module, "parse_tar", indexed_again)
    assert [_read(source, part, 3) for part in range(3)] == first
    assert source.stats.skipped_samples["incomplete"] == 2


def test_a_shard_the_manifest_does_not_pin_is_indexed_at_every_read(tmp_path):
    source = _source(tmp_path, _tar(_samples()), pinned=False)
    assert _read(source, 0, 1)[0] == (b"\x00", 0)
    (tmp_path / "s.tar").write_bytes(_tar(_samples(count=4, seed=7)))
    assert _read(source, 0, 1) == [(bytes([7 + i]) * (i + 1), (7 + i) % 3) for i in range(4)]


@pytest.mark.parametrize("label", [b"seven", b"", b"-1", b"+1", b"1_0", b"3", b"99999999999", b"9" * 5000])
def test_a_label_that_is_not_a_class_index_skips_its_shard_as_corrupt(tmp_path, label):
    samples = _samples()
    samples["k03"]["cls"] = label
    source = _source(tmp_path, _tar(samples), pinned=True)
    assert _read(source, 0, 1) == []
    assert source.stats.skipped_shards == {"corrupt": 1}
    source.check()   # a damaged shard is skipped and counted, not the end of training


OUTAGE = """
import sys
from trainer.data import Dataset, InputConfig
from trainer.shards import StorageGone
dataset = Dataset(InputConfig(data=sys.argv[1], image_size=32, batch_size=4, shuffle_mb=1))
fs, reads = dataset.source.fs, []
fetch = fs.cat_file


def failing(path, *args, **kwargs):   # the storage goes away after the second shard
    reads.append(path)
    if len(reads) > 2:
        raise ConnectionError("storage unreachable")
    return fetch(path, *args, **kwargs)


fs.cat_file = failing
try:
    with dataset.reader_errors():
        for _ in dataset.train(0, 1, 0, 3):
            pass
except StorageGone as exc:
    print("ended:", exc)
"""


def test_storage_lost_in_the_middle_of_an_epoch_ends_the_stream_with_the_reason(tmp_path):
    """A pass over the share read some shards, then none: the epoch's refill must not spin forever."""
    from ingest import synth

    from .conftest import REPO, run_cli

    synth.generate(str(tmp_path / "raw"), classes=2, train_per_class=20, val_per_class=2, size=32, seed=3)
    run_cli("ingest.shard", "--input", tmp_path / "raw", "--output", tmp_path / "shards", "--shard-size", "4",
            "--processes", "1", check=True)
    try:
        result = subprocess.run([sys.executable, "-c", OUTAGE, str(tmp_path / "shards")], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the stream kept running after the storage was gone")
    assert "ended: 20 shards in a row could not be read" in result.stdout, result.stderr[-2000:]


def test_many_corrupt_shards_in_a_row_are_not_blamed_on_the_storage(tmp_path):
    """Bad data is skipped and counted shard by shard (an epoch left short says so: EpochShort);
    "is the storage reachable?" is for shards that could not be read."""
    samples = _samples()
    samples["k01"]["cls"] = b"n01440764"   # a class name where its index belongs, in every shard
    data = _tar(samples)
    names = [f"s{i:03d}.tar" for i in range(2 * MAX_CONSECUTIVE_SKIPS)]
    for name in names:
        (tmp_path / name).write_bytes(data)
    expected = {name: (len(data), hashlib.sha256(data).hexdigest()) for name in names}
    source = ShardSource(Location(str(tmp_path)), expected=expected, classes=3)
    assert all(source.samples(name)[3].size == 0 for name in names)
    assert source.stats.skipped_shards == {"corrupt": len(names)}
    source.check()

"""trainer input: per-rank shard split, equal steps, shapes and ranges, augmentation, resilience, S3."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from ingest import synth
from trainer.augment import PRESETS, AugmentConfig, augment_batch, eval_image, train_image
from trainer.data import Dataset, InputConfig, available_cpus
from trainer.epochs import DecodeDrops, assign_shards
from trainer.launch import host_plan, slot_environment
from trainer.shards import ReadStats, StorageGone, parse_tar

from .conftest import run_cli
from .helpers import read_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small ingested dataset: 4 classes, 32 px, shards of 7 samples (uneven last shard)."""
    base = tmp_path_factory.mktemp("data")
    synth.generate(str(base / "tiny"), classes=4, train_per_class=20, val_per_class=6, size=32, seed=1)
    run_cli("ingest.shard", "--input", base / "tiny", "--output", base / "shards", "--shard-size", "7",
            "--processes", "1", check=True)
    return base / "shards"


def config(url, **overrides) -> InputConfig:
    return InputConfig(**{"data": str(url), "image_size": 32, "batch_size": 8, "shuffle_mb": 1, **overrides})


@pytest.mark.parametrize("shard_count", [12, 7, 3, 1])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 16])
def test_ranks_cover_every_sample_exactly_once(shard_count, size):
    samples_per_shard = {f"s{i}": 7 + i % 3 for i in range(shard_count)}
    for epoch in range(3):
        covered = Counter()
        for rank in range(size):
            for name, part, parts in assign_shards(list(samples_per_shard), epoch, 0, rank, size):
                covered.update((name, i) for i in range(samples_per_shard[name]) if i % parts == part)
        assert set(covered.values()) == {1}
        assert len(covered) == sum(samples_per_shard.values())


def test_epochs_permute_the_shards_the_same_way_on_every_rank():
    names = [f"s{i}" for i in range(10)]

    def permutation(epoch: int, seed: int, size: int) -> list[str]:
        """The ranks' lists dealt back together: rank r holds places r, r + size, ..."""
        order = [None] * len(names)
        for rank in range(size):
            for place, (name, _, _) in enumerate(assign_shards(names, epoch, seed, rank, size)):
                order[rank + place * size] = name
        return order

    for size in (1, 2, 3):
        assert sorted(permutation(0, 0, size)) == sorted(names)
        assert permutation(4, 3, size) == permutation(4, 3, 1)   # one permutation, however many ranks
    assert permutation(0, 0, 1) != permutation(1, 0, 1) and permutation(0, 0, 1) != permutation(0, 1, 1)
    # Ranks are separate processes: the permutation must not depend on the process (e.g. on hash()).
    probe = f"from trainer.epochs import assign_shards; print([n for n, _, _ in assign_shards({names!r}, 4, 3, 1, 2)])"
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str([n for n, _, _ in assign_shards(names, 4, 3, 1, 2)])


def _image_keys(dataset: Dataset, names: list[tuple[str, int, int]]) -> list[bytes]:
    """Decoded, un-augmented images of these shard parts, as bytes: what an epoch must pass over."""
    keys = []
    for name, part, parts in names:
        blob, offsets, lengths, _ = dataset.source.samples(name, part, parts)
        keys += [eval_image(blob[o:o + n], 32, PRESETS["none"]).numpy().tobytes() for o, n in zip(offsets, lengths)]
    return keys


@pytest.mark.parametrize("size", [1, 3])
def test_an_epoch_is_one_pass_over_each_ranks_share(shards, size):
    dataset = Dataset(config(shards, augment=PRESETS["none"], deterministic=True))
    names = [s["name"] for s in dataset.manifest["splits"]["train"]["shards"]]
    for epoch in (0, 1):
        steps = dataset.steps_in_epoch(epoch, size)
        for rank in range(size):
            share = _image_keys(dataset, assign_shards(names, epoch, 0, rank, size))
            seen = [image.tobytes() for images, _ in dataset.train(rank, size, epoch) for image in images.numpy()]
            assert len(seen) == steps * 8 <= len(share)     # every rank the same steps, whole batches
            assert len(set(seen)) == len(seen) and set(seen) <= set(share)


@pytest.mark.parametrize("size", [1, 2])
def test_a_stream_started_at_epoch_2_reads_what_the_whole_stream_reads_there(shards, size):
    dataset = Dataset(config(shards, deterministic=True, seed=7))   # augmentation on
    for rank in range(size):
        whole = list(dataset.train(rank, size, 0, 3))
        skipped = dataset.steps_in_epoch(0, size) + dataset.steps_in_epoch(1, size)
        resumed = list(dataset.train(rank, size, 2, 3))
        assert len(resumed) == len(whole) - skipped > 0
        for (a, y), (b, z) in zip(whole[skipped:], resumed, strict=True):
            assert np.array_equal(a, b) and np.array_equal(y, z)
        assert not np.array_equal(whole[0][0], resumed[0][0])   # epochs differ


@pytest.mark.timeout(60)
def test_a_stream_of_a_million_epochs_starts_at_once_and_reads_what_a_short_one_reads(shards):
    """A run's stream covers all its epochs (trainer.loop builds it once per run or resume): each
    epoch is planned when the stream reaches it, not all of them up front."""
    dataset = Dataset(config(shards, deterministic=True, seed=3))
    steps = dataset.steps_in_epoch(0, 2) + dataset.steps_in_epoch(1, 2)
    long = iter(dataset.train(1, 2, 0, 1_000_000))
    short = list(dataset.train(1, 2, 0, 2))
    assert len(short) == steps
    for a, b in zip(short, (next(long) for _ in range(steps)), strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_clean_dataset_read_for_many_epochs_loses_nothing(shards):
    """No batch fails, so none may be counted as dropped, however the epochs overlap in the stream."""
    dataset = Dataset(config(shards, batch_size=1))
    batches = sum(1 for _ in dataset.train(0, 1, 0, 6))
    assert batches == sum(dataset.steps_in_epoch(epoch, 1) for epoch in range(6))
    assert dataset.source.stats.snapshot()[2] == {}


@pytest.mark.parametrize("image_size", [32, 24])
def test_images_are_the_same_whether_or_not_the_manifest_knows_their_size(shards, image_size):
    """A split whose shards record one image size skips the per-image size check: same pixels."""
    known = Dataset(config(shards, deterministic=True, image_size=image_size))
    unknown = Dataset(config(shards, deterministic=True, image_size=image_size))
    for split in unknown.manifest["splits"].values():
        for shard in split["shards"]:
            shard.pop("image_size")
    assert known.image_size("train") == (32, 32) and unknown.image_size("train") is None
    for a, b in zip(list(known.train(0, 1, 0, 1)) + list(known.evaluate()),
                    list(unknown.train(0, 1, 0, 1)) + list(unknown.evaluate()), strict=True):
        assert a[0].shape[1:3] == (image_size, image_size)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("size", [1, 3, 20])
def test_evaluation_reads_each_sample_once_over_all_ranks(shards, size):
    dataset = Dataset(config(shards))
    labels = np.concatenate([y.numpy() for rank in range(size) for _, y in dataset.evaluate("val", rank, size)])
    _, stored = read_dataset(str(shards))
    assert sorted(labels.tolist()) == sorted(s["cls"] for s in stored["val"].values())


@pytest.mark.parametrize("size", [1, 3, 20])
def test_training_streams_never_run_dry(shards, size):
    dataset = Dataset(config(shards, batch_size=1))
    steps = [dataset.steps_in_epoch(epoch, size) for epoch in range(3)]
    assert all(steps) and max(steps) <= dataset.samples("train") // size
    for rank in range(size):   # every rank runs the same steps: none waits in an allreduce for ever
        assert sum(1 for _ in dataset.train(rank, size, 0, 3)) == sum(steps)


def test_batches_have_the_right_shapes_types_and_ranges(shards):
    dataset = Dataset(config(shards))
    images, labels = next(iter(dataset.train()))
    # uint8 RGB, as the saved model takes them: the model scales them itself (trainer.models.classifier).
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.uint8
    assert labels.shape == (8,) and labels.dtype == tf.int32
    assert 0 <= int(tf.reduce_min(labels)) and int(tf.reduce_max(labels)) < dataset.num_classes
    assert float(tf.math.reduce_std(tf.cast(images, tf.float32))) > 10


def _jpeg(size=32) -> tf.Tensor:
    image, _ = synth.render(3, np.random.default_rng(0), size)
    return tf.io.encode_jpeg(image)


@pytest.mark.parametrize("preset", ["tinyimagenet", "imagenet"])
def test_augmentation_changes_images_and_eval_does_not(preset):
    jpeg = _jpeg(48)
    augment = AugmentConfig(**{**PRESETS[preset].__dict__, "color_jitter": 0.4})

    def augmented(seed):
        image = train_image(jpeg, tf.constant(seed, tf.int64), 32, augment)
        return augment_batch(tf.stack([image] * 4), tf.constant(seed, tf.int64), augment)

    first, again, other = augmented([1, 2]), augmented([1, 2]), augmented([3, 4])
    assert first.shape == (4, 32, 32, 3) and first.dtype == tf.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert len({first[i].numpy().tobytes() for i in range(4)}) > 1   # each image of a batch drawn on its own
    evaluated = eval_image(jpeg, 32, augment)
    assert np.array_equal(evaluated, eval_image(jpeg, 32, augment))


def test_eval_of_a_right_sized_image_is_just_decode():
    jpeg = _jpeg(32)
    expected = tf.io.decode_jpeg(jpeg, channels=3)
    assert np.array_equal(eval_image(jpeg, 32, PRESETS["tinyimagenet"]), expected)
    assert np.array_equal(train_image(jpeg, tf.constant([5, 6]), 32, PRESETS["none"]), expected)


def test_a_rank_launched_beside_another_streams_on_its_share_of_the_cores(shards, monkeypatch):
    """The environment trainer.launch gives a pod's second slot sizes the stream's own thread pool."""
    plan = host_plan(2, 2, "trainer-{index}.trainer")
    for name, value in slot_environment(plan[1], "trainer-0.trainer", 29500, "eth0").items():
        monkeypatch.setenv(name, value)
    stream = Dataset(config(shards)).train(rank=1, size=4)
    assert stream.options().threading.private_threadpool_size == max(1, available_cpus() // 2)
    monkeypatch.delenv("HOROVOD_LOCAL_SIZE")
    assert Dataset(config(shards)).train().options().threading.private_threadpool_size == available_cpus()


def test_deterministic_mode_repeats_the_same_order(shards):
    first = next(iter(Dataset(config(shards, deterministic=True, seed=4)).train(1, 2)))
    second = next(iter(Dataset(config(shards, deterministic=True, seed=4)).train(1, 2)))
    third = next(iter(Dataset(config(shards, deterministic=True, seed=5)).train(1, 2)))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], third[0])


def test_corrupt_and_missing_shards_are_skipped_and_counted(shards, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest, stored = read_dataset(str(broken))
    val = manifest["splits"]["val"]["shards"]
    (broken / val[0]["name"]).write_bytes(b"\x01" * 1024)
    os.remove(broken / val[1]["name"])
    stats = ReadStats()
    dataset = Dataset(config(broken), stats)
    labels = np.concatenate([y.numpy() for _, y in dataset.evaluate("val")])
    assert len(labels) == manifest["splits"]["val"]["samples"] - val[0]["samples"] - val[1]["samples"]
    assert stats.skipped_shards == Counter({"corrupt": 1, "missing": 1})


def test_parse_tar_agrees_with_tarfile(shards, tmp_path):
    data = (shards / "train-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            expected.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert payloads(data, parse_tar(data)) == expected


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_parse_tar_reads_long_names_in_each_format(tar_format):
    """Names over 100 bytes: a PAX record, a GNU long-name member, or a ustar prefix field."""
    buffer = io.BytesIO()
    long_key = "k" * 90
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, payload in ((f"{'d' * 120}/{long_key}.jpg", b"abc"), ("dir/short.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    assert payloads(data, parse_tar(data)) == {long_key: {"jpg": b"abc"}, "short": {"cls": b"7"}}


def payloads(data: bytes, members: dict) -> dict:
    return {key: {ext: data[a:b] for ext, (a, b) in spans.items()} for key, spans in members.items()}


def test_reading_through_s3(shards, s3_bucket):
    url = f"s3://{s3_bucket}/shards"
    run_cli("ingest.shard", "--input", shards.parent / "tiny", "--output", url, "--shard-size", "7",
            "--processes", "1", check=True)
    dataset = Dataset(config(url))
    labels = np.concatenate([y.numpy() for _, y in dataset.evaluate("val")])
    assert len(labels) == dataset.samples("val")
    images, _ = next(iter(dataset.train()))
    assert images.shape == (8, 32, 32, 3)


def test_a_dataset_whose_shards_are_all_gone_fails_instead_of_hanging(shards, tmp_path):
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    for path in gone.glob("train-*.tar"):
        path.unlink()
    dataset = Dataset(config(gone))
    with pytest.raises(tf.errors.OpError, match="shards in a row could not be read"):
        next(iter(dataset.train(0, 1, 0, 3)))   # 12 shards an epoch: the 20th skip is in epoch 1
    with pytest.raises(StorageGone, match="shards in a row could not be read"):
        dataset.source.check()


def test_readers_on_several_threads_keep_the_first_fatal_failure(shards):
    from concurrent.futures import ThreadPoolExecutor

    from ingest.storage import Location
    from trainer.shards import MAX_CONSECUTIVE_SKIPS, ShardSource

    source = ShardSource(Location(str(shards)))
    missing = [f"absent-{i:03d}.tar" for i in range(4 * MAX_CONSECUTIVE_SKIPS)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(source.samples, missing))
    assert all(len(offsets) == 0 for _, offsets, _, _ in results)
    assert str(source.failure).startswith(f"{MAX_CONSECUTIVE_SKIPS} shards in a row could not be read")
    assert source.stats.skipped_shards["missing"] >= MAX_CONSECUTIVE_SKIPS


def _damage(root, name: str, damage) -> bytes:
    """Rewrite a shard with `damage(data, members)` applied, returning the new bytes."""
    data = bytearray((root / name).read_bytes())
    damage(data, parse_tar(bytes(data)))
    (root / name).write_bytes(data)
    return bytes(data)


def test_a_shard_that_differs_from_the_manifest_is_skipped_as_corrupt(shards, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    manifest, _ = read_dataset(str(damaged))
    first = manifest["splits"]["val"]["shards"][0]

    def flip_a_pixel_byte(data, members):   # a valid tar, a decodable JPEG: only the sha256 can tell
        start, end = next(iter(members.values()))["jpg"]
        data[(start + end) // 2] ^= 0x01

    _damage(damaged, first["name"], flip_a_pixel_byte)
    stats = ReadStats()
    dataset = Dataset(config(damaged), stats)
    labels = np.concatenate([y.numpy() for _, y in dataset.evaluate("val")])
    assert len(labels) == manifest["splits"]["val"]["samples"] - first["samples"]
    assert stats.skipped_shards == Counter({"corrupt": 1})


def test_an_image_that_fails_to_decode_is_skipped_and_counted(shards, tmp_path):
    import hashlib
    import json
    import shutil

    damaged = tmp_path / "undecodable"
    shutil.copytree(shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    for split in ("train", "val"):
        first = manifest["splits"][split]["shards"][0]

        def garble_one_image(data, members):
            start, end = sorted(members.items())[2][1]["jpg"]
            data[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 4) + b"\xff\xd9"

        data = _damage(damaged, first["name"], garble_one_image)
        first["sha256"] = hashlib.sha256(data).hexdigest()   # as if ingest had written it so
    (damaged / "manifest.json").write_text(json.dumps(manifest))

    stats = ReadStats()
    dataset = Dataset(config(damaged), stats)
    labels = np.concatenate([y.numpy() for _, y in dataset.evaluate("val")])
    lost = manifest["splits"]["val"]["samples"] - len(labels)
    assert 1 <= lost <= 8                     # the bad image's batch (of 8), every sample accounted for
    assert stats.skipped_samples == Counter({"undecodable": lost}) and stats.skipped_shards == Counter()

    train_stats = ReadStats()
    dataset = Dataset(config(damaged), train_stats)
    batches = sum(1 for _ in dataset.train(0, 1, 0, 3))
    # Every epoch keeps its steps: the bad image's batch is replaced from a spare pass, and counted.
    assert batches == sum(dataset.steps_in_epoch(epoch, 1) for epoch in range(3))
    assert train_stats.skipped_samples["undecodable"] >= 8


def _garbled(shards, tmp_path, every: int):
    """A copy of the dataset whose every `every`-th train image (in each shard) cannot be decoded,
    with the manifest's sha256 updated, as if ingest had written them so."""
    import hashlib
    import json
    import shutil

    damaged = tmp_path / f"garbled-{every}"
    shutil.copytree(shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())

    def garble(data, members):
        for _, spans in sorted(members.items())[::every]:
            start, end = spans["jpg"]
            data[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 4) + b"\xff\xd9"

    for shard in manifest["splits"]["train"]["shards"]:
        shard["sha256"] = hashlib.sha256(_damage(damaged, shard["name"], garble)).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    return damaged


@pytest.mark.parametrize("size", [1, 2])
def test_an_epoch_keeps_its_steps_when_most_of_its_batches_fail(shards, tmp_path, size):
    """Two images in each shard of 7 undecodable: ~64% of the batches of 3 fail; one spare pass could
    not refill an epoch, three do."""
    dataset = Dataset(config(_garbled(shards, tmp_path, 5), batch_size=3, deterministic=True))
    for rank in range(size):
        for epoch in range(3):
            assert sum(1 for _ in dataset.train(rank, size, epoch)) == dataset.steps_in_epoch(epoch, size)
    assert dataset.source.stats.skipped_samples["undecodable"] > 0


def test_a_share_too_damaged_to_fill_an_epoch_ends_the_stream_with_the_reason(shards, tmp_path):
    from trainer.epochs import EpochShort

    dataset = Dataset(config(_garbled(shards, tmp_path, 1)))   # no image decodes
    with pytest.raises(EpochShort, match="epoch 0: only 0 of the .* batches"), dataset.reader_errors():
        list(dataset.train(0, 1, 0, 3))


def test_decode_drops_count_the_batches_missing_from_the_numbers_and_what_never_came():
    stats = ReadStats()
    drops = DecodeDrops(stats, batch_size=8)
    drops.enter(30)
    drops.see(0, 8)
    drops.see(2, 8)                         # batch 1 failed: 8 samples
    assert stats.skipped_samples == Counter({"undecodable": 8})
    drops.finish()                          # the last batch (6 samples) never came
    assert stats.skipped_samples == Counter({"undecodable": 14})
    expected = DecodeDrops(stats := ReadStats(), batch_size=8, expected=24)
    expected.enter(1000)                    # a training epoch reads more than it takes: ignored
    expected.see(0, 8)
    expected.finish()
    assert stats.skipped_samples == Counter({"undecodable": 16})


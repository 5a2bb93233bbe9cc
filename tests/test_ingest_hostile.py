"""Hostile and damaged input: every case is rejected and listed (with its reason) or refused
with a one-line error naming it; never a traceback, never a file read from outside the input;
and `ingest.verify` names every way a finished dataset can be tampered with."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ingest import synth
from ingest.errors import EXIT_INCOMPLETE, EXIT_INPUT

from .conftest import run_cli
from .helpers import read_dataset

# Non-UTF-8 bytes in a name, as Python holds them (surrogate escapes of the raw bytes).
BAD_BYTE = b"\xff".decode("utf-8", "surrogateescape")


def ingest(source, out, *extra):
    return run_cli("ingest.shard", "--input", source, "--output", out, "--processes", "1", *extra)


def ingest_ok(source, out, *extra) -> tuple[dict, dict]:
    result = ingest(source, out, *extra)
    assert result.returncode == 0, result.stderr
    return read_dataset(str(out))


def rejected(manifest: dict) -> set[tuple[str, str, str]]:
    return {(r["split"], r["source"], r["reason"]) for r in manifest["rejected"]}


def error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def jpeg_bytes(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- bombs


def png_bomb() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) \
        + chunk(b"IEND", b"")


def jpeg_bomb() -> bytes:
    data = bytearray(jpeg_bytes())
    frame = data.find(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def gif_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 60000, 60000)          # logical screen
    descriptor = data.find(b",")
    data[descriptor + 5:descriptor + 9] = struct.pack("<HH", 60000, 60000)
    return bytes(data)


def test_decompression_bombs_are_rejected_without_being_decoded(tmp_path):
    source = tmp_path / "folder"
    truth = synth.generate(str(source), layout="imagefolder", classes=2, train_per_class=3, val_per_class=1, size=32)
    folder = source / "train" / truth.wnids[0]
    bombs = {"bomb_png.jpg": png_bomb(), "bomb_jpeg.jpg": jpeg_bomb(), "bomb_gif.gif": gif_bomb()}
    for name, data in bombs.items():
        (folder / name).write_bytes(data)      # a few hundred bytes declaring billions of pixels
    # --validate full decodes every other image; these must be refused from their headers.
    manifest, splits = ingest_ok(source, tmp_path / "out", "--validate", "full")
    assert rejected(manifest) == {("train", f"train/{truth.wnids[0]}/{name}", "too_large") for name in bombs}
    assert len(splits["train"]) == len(truth.splits["train"])


# --------------------------------------------------------------------------- ILSVRC2012 tars


@pytest.fixture
def ilsvrc(tmp_path):
    path = tmp_path / "ilsvrc"
    truth = synth.generate(str(path), layout="imagenet", classes=3, train_per_class=5, val_per_class=2, size=32,
                           seed=3)
    return truth, path


def read_tar(source: Path | bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    opened = tarfile.open(fileobj=io.BytesIO(source)) if isinstance(source, bytes) else tarfile.open(source)
    with opened as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive]


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def member(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, data


def test_ilsvrc_members_with_unsafe_names_links_or_damage_are_listed_never_used(ilsvrc, tmp_path):
    truth, root = ilsvrc
    train_tar, val_tar = root / "ILSVRC2012_img_train.tar", root / "ILSVRC2012_img_val.tar"
    outer = read_tar(train_tar)
    first, second = outer[0][0].name, outer[1][0].name        # <wnid>.tar
    hostile = [member("../escape.JPEG", jpeg_bytes()), member("/etc/absolute.JPEG", jpeg_bytes()),
               member("symlink.JPEG", kind=tarfile.SYMTYPE, link="../../../etc/passwd"),
               member("hardlink.JPEG", kind=tarfile.LNKTYPE, link="../escape.JPEG"),
               member(f"name_{BAD_BYTE}.JPEG", jpeg_bytes())]
    inner = read_tar(outer[0][1])
    outer[0] = (outer[0][0], tar_bytes(inner + hostile))
    damaged = read_tar(outer[1][1])
    cut = damaged[2][0].offset_data + 10                     # inside the third image's bytes
    outer[1] = (outer[1][0], outer[1][1][:cut])
    outer += [member("../n99999999.tar", tar_bytes(inner)), member("evil.tar", kind=tarfile.SYMTYPE, link="/")]
    train_tar.write_bytes(tar_bytes(outer))

    val = read_tar(val_tar)
    removed = val.pop(1)[0].name                             # ILSVRC2012_val_00000002.JPEG
    val += [member("/ILSVRC2012_val_00000003.JPEG", val[1][1]), val[2],
            member("ILSVRC2012_val_00000099.JPEG", kind=tarfile.SYMTYPE, link="ILSVRC2012_val_00000001.JPEG"),
            member(f"ILSVRC2012_val_{BAD_BYTE}.JPEG", val[0][1])]
    val_tar.write_bytes(tar_bytes(val))

    manifest, splits = ingest_ok(root, tmp_path / "out")
    t, v = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
    assert rejected(manifest) == {
        ("train", f"{t}/{first}/../escape.JPEG", "unsafe_path"), ("train", f"{t}/{first}//etc/absolute.JPEG", "unsafe_path"),
        ("train", f"{t}/{first}/symlink.JPEG", "not_a_file"), ("train", f"{t}/{first}/hardlink.JPEG", "not_a_file"),
        ("train", f"{t}/{first}/name_\\xff.JPEG", "bad_name"), ("train", f"{t}/{second}", "unreadable"),
        ("train", f"{t}/../n99999999.tar", "unsafe_path"), ("train", f"{t}/evil.tar", "not_a_file"),
        ("val", f"{v}/{removed}", "missing_file"), ("val", f"{v}//ILSVRC2012_val_00000003.JPEG", "unsafe_path"),
        ("val", f"{v}/{val[2][0].name}", "duplicate_key"), ("val", f"{v}/ILSVRC2012_val_00000099.JPEG", "not_a_file"),
        ("val", f"{v}/ILSVRC2012_val_\\xff.JPEG", "bad_name"),
    }
    lost = {m.name.split(".")[0] for m, _ in damaged[2:]} | {removed.split(".")[0]}
    expected = {split: {k: truth.wnids.index(w) for k, w in keys.items() if k not in lost}
                for split, keys in truth.splits.items()}
    assert {split: {k: s["cls"] for k, s in samples.items()} for split, samples in splits.items()} == expected


@pytest.mark.parametrize("damage, fragments", [
    ("devkit_member_escapes", ["ILSVRC2012_devkit_t12.tar.gz", "../data/meta.mat", "an absolute path or has '..'"]),
    ("devkit_member_is_a_link", ["ILSVRC2012_devkit_t12.tar.gz", "data/meta.mat", "link"]),
    ("train_tar_truncated", ["ILSVRC2012_img_train.tar: not a readable tar (unexpected end of data)"]),
])
def test_a_damaged_ilsvrc_archive_is_refused_naming_it(damage, fragments, ilsvrc, tmp_path):
    _, root = ilsvrc
    devkit = root / "ILSVRC2012_devkit_t12.tar.gz"
    if damage == "train_tar_truncated":
        outer = read_tar(root / "ILSVRC2012_img_train.tar")
        (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(outer)[:outer[1][0].offset_data + 700])
    else:
        members = read_tar(devkit)
        meta = next(i for i, (m, _) in enumerate(members) if m.name.endswith("data/meta.mat"))
        members[meta] = (member("../data/meta.mat", members[meta][1]) if damage == "devkit_member_escapes"
                         else member(members[meta][0].name, kind=tarfile.SYMTYPE, link="/etc/passwd"))
        devkit.write_bytes(tar_bytes(members, "w:gz"))
    result = ingest(root, tmp_path / "out")
    assert result.returncode == EXIT_INPUT
    line = error_line(result)
    assert all(fragment in line for fragment in fragments), line


# --------------------------------------------------------------------------- folders


def test_links_and_undecodable_names_in_folders(tmp_path):
    """Links are followed to files inside the dataset folder; links leading outside it, broken
    ones and names that are not UTF-8 are listed, never read."""
    root = tmp_path / "tiny"
    truth = synth.generate(str(root), classes=3, train_per_class=3, val_per_class=1, size=32, seed=1)
    w0, w1, w2 = truth.wnids
    images = root / "train" / w0 / "images"
    (tmp_path / "secret.JPEG").write_bytes(jpeg_bytes())
    (images / f"{w0}_inside.JPEG").symlink_to(root / "train" / w1 / "images" / f"{w1}_0.JPEG")
    (images / f"{w0}_outside.JPEG").symlink_to(tmp_path / "secret.JPEG")
    (images / f"{w0}_dangling.JPEG").symlink_to(tmp_path / "nothing.JPEG")
    (images / f"{w0}_loop.JPEG").symlink_to(images / f"{w0}_loop.JPEG")
    with open(os.fsencode(images) + f"/{w0}_".encode() + b"\xff.JPEG", "wb") as handle:
        handle.write(jpeg_bytes())
    moved = shutil.move(root / "train" / w2 / "images", tmp_path / "elsewhere")   # a whole folder linked in
    (root / "train" / w2 / "images").symlink_to(moved)

    manifest, splits = ingest_ok(root, tmp_path / "out")
    linked = {("train", f"train/{w2}/images/{p.name}", "unsafe_path") for p in Path(moved).iterdir()}
    assert len(linked) == 3
    assert rejected(manifest) == linked | {
        ("train", f"train/{w0}/images/{w0}_outside.JPEG", "unsafe_path"),
        ("train", f"train/{w0}/images/{w0}_dangling.JPEG", "not_a_file"),
        ("train", f"train/{w0}/images/{w0}_loop.JPEG", "not_a_file"),
        ("train", f"train/{w0}/images/{w0}_\\xff.JPEG", "bad_name"),
    }
    expected = {k for k, w in truth.splits["train"].items() if w != w2} | {f"{w0}_inside"}
    assert set(splits["train"]) == expected
    assert splits["train"][f"{w0}_inside"]["jpg"] == splits["train"][f"{w1}_0"]["jpg"]


def test_a_class_folder_not_named_in_utf8_is_refused(tmp_path):
    source = tmp_path / "folder"
    truth = synth.generate(str(source), layout="imagefolder", classes=2, train_per_class=2, val_per_class=1, size=32)
    os.rename(source / "train" / truth.wnids[0], os.fsencode(source / "train") + b"/caf\xe9")
    result = ingest(source, tmp_path / "out")
    assert result.returncode == EXIT_INPUT
    assert "class folder caf\\xe9 is not named in UTF-8" in error_line(result)


def test_duplicate_keys_are_stored_once_and_listed(tmp_path):
    source = tmp_path / "folder"
    truth = synth.generate(str(source), layout="imagefolder", classes=2, train_per_class=2, val_per_class=1, size=32)
    folder = source / "train" / truth.wnids[0]
    original = sorted(folder.iterdir())[0]
    shutil.copy(original, original.with_suffix(".png"))      # same stem, so the same key
    manifest, splits = ingest_ok(source, tmp_path / "out")
    (duplicate,) = manifest["rejected"]
    assert duplicate["reason"] == "duplicate_key" and duplicate["source"].endswith(".png")
    assert duplicate["detail"].endswith(f"already used by train/{truth.wnids[0]}/{original.name}")
    assert len(splits["train"]) == len(truth.splits["train"])


def test_a_kaggle_val_annotation_for_a_missing_file_is_listed(tmp_path):
    source = tmp_path / "kaggle"
    truth = synth.generate(str(source), layout="imagenet-kaggle", classes=2, train_per_class=2, val_per_class=2,
                           size=32)
    val = source / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    gone = sorted(val.iterdir())[0]
    gone.unlink()
    manifest, splits = ingest_ok(source, tmp_path / "out")
    assert rejected(manifest) == {("val", f"ILSVRC/Data/CLS-LOC/val/{gone.name}", "missing_file")}
    assert len(splits["val"]) == len(truth.splits["val"]) - 1


def test_a_damaged_member_of_the_input_zip_is_rejected_as_unreadable(tmp_path):
    path = tmp_path / "tiny-imagenet-200.zip"
    truth = synth.generate(str(path), classes=2, train_per_class=3, val_per_class=1, size=32, zip=True)
    name = f"train/{truth.wnids[0]}/images/{truth.wnids[0]}_0.JPEG"
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo(f"tiny-imagenet-200/{name}").header_offset
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_length + extra_length
    data[start + 20:start + 40] = bytes(20)                  # the stored bytes no longer match their CRC
    path.write_bytes(bytes(data))
    manifest, splits = ingest_ok(path, tmp_path / "out")
    assert rejected(manifest) == {("train", name, "unreadable")}
    assert len(splits["train"]) == len(truth.splits["train"]) - 1


def test_a_truncated_input_zip_is_refused_naming_it(tmp_path):
    path = tmp_path / "tiny-imagenet-200.zip"
    synth.generate(str(path), classes=2, train_per_class=3, val_per_class=1, size=32, zip=True)
    path.write_bytes(path.read_bytes()[:-100])
    result = ingest(path, tmp_path / "out")
    assert result.returncode == EXIT_INPUT
    assert f"error: {path}: not a readable zip" in error_line(result)


# --------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    synth.generate(str(base / "tiny"), classes=3, train_per_class=6, val_per_class=2, size=32, seed=8)
    ingest_ok(base / "tiny", base / "out", "--shard-size", "6")
    return base / "out"


@pytest.fixture
def dataset(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "out"))


def edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def first_shard(manifest: dict) -> dict:
    return manifest["splits"]["train"]["shards"][0]


@pytest.mark.parametrize("lie, line", [
    (lambda m: first_shard(m).update(sha256="0" * 64), "train-000000.tar: sha256"),
    (lambda m: first_shard(m).update(bytes=first_shard(m)["bytes"] + 512), "train-000000.tar: size"),
    (lambda m: m["splits"]["train"].update(samples=99), "split train: manifest says 99 samples, its shards list 18"),
], ids=["sha256", "bytes", "split samples"])
def test_verify_names_what_a_manifest_gets_wrong(lie, line, dataset):
    edit_manifest(dataset, lie)
    result = run_cli("ingest.verify", dataset)
    assert result.returncode == EXIT_INCOMPLETE
    assert [problem for problem in result.stdout.splitlines() if problem.startswith(line)], result.stdout


@pytest.mark.parametrize("lie, fragment", [
    (lambda m: m["splits"]["train"]["shards"].append(first_shard(m)), "shard train-000000.tar listed twice"),
    (lambda m: first_shard(m).update(name="../../elsewhere.tar"), "'../../elsewhere.tar' is not a plain .tar"),
    (lambda m: first_shard(m).update(sha256=None), "train-000000.tar: sha256 is not a hex digest"),
    (lambda m: m.pop("splits"), "malformed"),
], ids=["shard twice", "path", "no sha256", "no splits"])
def test_verify_refuses_a_manifest_that_cannot_be_used(lie, fragment, dataset):
    edit_manifest(dataset, lie)
    result = run_cli("ingest.verify", dataset)
    assert result.returncode == EXIT_INPUT
    line = error_line(result)
    assert f"{dataset}/manifest.json:" in line and fragment in line


def test_verify_refuses_a_manifest_that_is_not_json(dataset):
    (dataset / "manifest.json").write_text('{"format": "webdataset-imagenet", ')
    result = run_cli("ingest.verify", dataset)
    assert result.returncode == EXIT_INPUT and "manifest.json: not valid JSON" in error_line(result)


def test_verify_names_members_injected_into_a_shard(dataset):
    """The manifest re-hashed to match, as an attacker with write access would."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    twice, extended = manifest["splits"]["train"]["shards"][:2]
    repeated = inject(dataset, twice, lambda first: first.name)
    inject(dataset, extended, lambda first: "intruder.jpg")
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("ingest.verify", dataset)
    assert result.returncode == EXIT_INCOMPLETE
    assert f"{twice['name']}: member {repeated} appears twice" in result.stdout
    assert f"{extended['name']}: 7 samples, manifest says 6" in result.stdout


def inject(dataset: Path, shard: dict, name_for) -> str:
    """Append a copy of the shard's first member under name_for(its TarInfo); fix the manifest entry."""
    members = read_tar(dataset / shard["name"])
    name = name_for(members[0][0])
    data = tar_bytes([*members, member(name, members[0][1])])
    (dataset / shard["name"]).write_bytes(data)
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return name

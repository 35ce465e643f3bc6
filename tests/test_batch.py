"""python -m serving.batch over a real folder: nested images, broken files, odd names and file types, CSV out."""

import csv
import os
import stat
import struct
import zlib
from argparse import Namespace

import numpy as np
import pytest
from PIL import Image

from serving import batch
from tests.conftest import png_bytes, run_cli

ONNX = "model_store/default/fashion-lenet.onnx"


def score_folder(folder, output):
    """Run the scorer as a user would; a hang (a FIFO opened) fails the test instead of the session."""
    return run_cli("-m", "serving.batch", str(folder), "--output", str(output), "--onnx", ONNX, timeout=120)


def read_rows(output) -> dict[str, dict[str, str]]:
    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid 8x8 PNG with one extra chunk, CRC and all, right after IHDR."""
    png = png_bytes(np.zeros((8, 8), np.uint8))
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def test_scores_a_folder_reports_broken_files_and_keeps_going(tmp_path, fashion_test):
    from training.fashion_mnist import FASHION_MNIST_CLASSES

    images, labels = fashion_test
    folder = tmp_path / "photos"
    truth = {}
    for i in range(120):
        path = folder / f"class_{labels[i]}" / ("deep" if i % 3 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(images[i]))
        truth[path.relative_to(folder).as_posix()] = FASHION_MNIST_CLASSES[labels[i]]
    Image.fromarray(images[200]).convert("RGB").resize((280, 280)).save(folder / "big.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(png_bytes(images[0])[:40])
    output = tmp_path / "out" / "predictions.csv"

    result = run_cli(
        "-m",
        "serving.batch",
        str(folder),
        "--output",
        str(output),
        "--batch-size",
        "32",
        "--onnx",
        "model_store/default/fashion-lenet.onnx",
    )
    assert result.returncode == 0, result.stderr
    assert "scored 121 of 123 files (2 failed)" in result.stdout
    rows = {row["path"]: row for row in csv.DictReader(open(output))}
    assert len(rows) == 123
    assert "not a supported image" in rows["notes.txt"]["error"] and rows["notes.txt"]["label"] == ""
    assert "truncated" in rows["broken.png"]["error"]
    assert rows["big.jpg"]["error"] == "" and rows["big.jpg"]["label"] in FASHION_MNIST_CLASSES
    correct = sum(rows[name]["label"] == label for name, label in truth.items())
    assert correct / len(truth) >= 0.85
    assert len(rows["class_9/img0.png"]["top_k"].split(";")) == 3
    assert [p.name for p in output.parent.iterdir()] == ["predictions.csv"]  # no temp file left


def test_bad_arguments_fail_in_one_line(tmp_path):
    missing = run_cli("-m", "serving.batch", str(tmp_path / "nope"), "--output", str(tmp_path / "o.csv"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: folder")
    bad_k = run_cli(
        "-m",
        "serving.batch",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
        "--top-k",
        "11",
        "--onnx",
        "model_store/default/fashion-lenet.onnx",
    )
    assert bad_k.returncode == 2 and "--top-k must be from 1 to 10" in bad_k.stderr
    unknown = run_cli(
        "-m",
        "serving.batch",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
        "--model",
        "no-such:v1",
        env={"BENTOML_HOME": str(tmp_path / "home")},
    )
    assert unknown.returncode == 2 and "not in the BentoML model store" in unknown.stderr
    assert not (tmp_path / "o.csv").exists()


def test_serving_path_does_not_import_torch():
    code = "import sys, serving.service, serving.batch; assert 'torch' not in sys.modules, 'torch imported'"
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr


def test_a_crafted_or_random_file_costs_its_row_not_the_run(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(fashion_test[0][0]))
    (folder / "bad_exif.png").write_bytes(png_with_chunk(b"eXIf", b"this is not TIFF data"))
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(3000))

    result = score_folder(folder, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    assert "scored 1 of 3 files (2 failed)" in result.stdout
    rows = read_rows(tmp_path / "out.csv")
    assert rows["good.png"]["error"] == "" and rows["good.png"]["label"]
    assert rows["bad_exif.png"]["error"] and rows["bad_exif.png"]["label"] == ""
    assert "not a supported image" in rows["random.png"]["error"]


def test_any_exception_from_decoding_costs_only_that_row(tmp_path, fashion_test, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    crash = png_bytes(fashion_test[0][0])
    (folder / "crash.png").write_bytes(crash)
    (folder / "good.png").write_bytes(png_bytes(fashion_test[0][1]))
    decode = batch.image_bytes_to_input

    def decoder_with_a_bug(data, card):
        if data == crash:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return decode(data, card)

    monkeypatch.setattr(batch, "image_bytes_to_input", decoder_with_a_bug)
    args = Namespace(folder=folder, output=tmp_path / "out.csv", onnx=ONNX, batch_size=8, top_k=3, workers=2)
    assert batch.main(args) == (1, 1)
    rows = read_rows(args.output)
    assert rows["crash.png"]["error"] == "struct.error: unpack requires a buffer of 4 bytes"
    assert rows["good.png"]["label"] and rows["good.png"]["error"] == ""


def test_every_name_round_trips_and_none_becomes_a_formula(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = png_bytes(fashion_test[0][0])
    names = ["=cmd.png", "+x.png", "-y.png", "@z.png", "\tt.png", "plain.png"]
    for name in names:
        (folder / name).write_bytes(image)
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:  # not valid UTF-8
        f.write(image)

    result = score_folder(folder, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    assert "scored 7 of 7 files (0 failed)" in result.stdout
    assert b"bad\xff.png" in (tmp_path / "out.csv").read_bytes()  # the name's bytes on disk, as they are
    rows = read_rows(tmp_path / "out.csv")
    assert set(rows) == {
        "'=cmd.png",
        "'+x.png",
        "'-y.png",
        "'@z.png",
        "'\tt.png",
        "plain.png",
        os.fsdecode(b"bad\xff.png"),
    }
    assert all(row["label"] and row["error"] == "" for row in rows.values())


def test_only_regular_files_inside_the_folder_are_read(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "good.png").write_bytes(png_bytes(fashion_test[0][0]))
    (tmp_path / "secret.png").write_bytes(png_bytes(fashion_test[0][1]))
    (folder / "inside.png").symlink_to("sub/good.png")
    (folder / "outside.png").symlink_to(tmp_path / "secret.png")
    (folder / "dangling.png").symlink_to("nowhere.png")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "folder_link").symlink_to(tmp_path)  # would score secret.png if followed
    (folder / "sub_link").symlink_to("sub")  # would score sub/good.png twice if followed
    os.mkfifo(folder / "fifo.png")  # opening it would block the run forever
    os.mknod(folder / "socket.png", stat.S_IFSOCK | 0o600)
    (folder / ".hidden.png").write_bytes(png_bytes(fashion_test[0][2]))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes(png_bytes(fashion_test[0][3]))

    result = score_folder(folder, tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    assert "scored 2 of 9 files (7 failed)" in result.stdout and "2 hidden entries skipped" in result.stdout
    rows = read_rows(tmp_path / "out.csv")
    assert list(rows) == [
        "dangling.png",
        "fifo.png",
        "folder_link",
        "inside.png",
        "loop.png",
        "outside.png",
        "socket.png",
        "sub/good.png",
        "sub_link",
    ]
    assert rows["inside.png"]["label"] == rows["sub/good.png"]["label"] != ""
    assert "leads outside the folder" in rows["outside.png"]["error"] and rows["outside.png"]["label"] == ""
    assert "dangling or looping symlink to 'nowhere.png'" in rows["dangling.png"]["error"]
    assert "dangling or looping symlink to 'loop.png'" in rows["loop.png"]["error"]
    assert "symlink to a folder" in rows["sub_link"]["error"]
    assert "leads outside the folder" in rows["folder_link"]["error"]
    assert "not a regular file but a FIFO" in rows["fifo.png"]["error"]
    assert "not a regular file but a socket" in rows["socket.png"]["error"]


def test_a_device_file_is_listed_and_not_opened(tmp_path):
    try:
        os.mknod(tmp_path / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device file needs CAP_MKNOD")
    entries, _ = batch.list_files(tmp_path)
    assert [(e.name, e.problem) for e in entries] == [
        ("null.png", "not a regular file but a character device; not opened")
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files and folders whatever their mode")
def test_unreadable_files_and_folders_get_their_os_error(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked.png").write_bytes(png_bytes(fashion_test[0][0]))
    (folder / "locked.png").chmod(0)
    (folder / "locked").chmod(0)
    try:
        result = score_folder(folder, tmp_path / "out.csv")
    finally:
        (folder / "locked").chmod(0o700)
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "out.csv")
    assert "Permission denied" in rows["locked.png"]["error"]
    assert "cannot list folder" in rows["locked"]["error"] and "Permission denied" in rows["locked"]["error"]


def test_each_file_is_read_once_in_a_stable_order(tmp_path, fashion_test, monkeypatch):
    folder = tmp_path / "photos"
    names = ["b.png", "a/z.png", "a/b/c.png", "a b.png", "c.png"]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png_bytes(fashion_test[0][i]))
    reads = []
    read = batch._read_regular_file
    monkeypatch.setattr(batch, "_read_regular_file", lambda path: reads.append(path.name) or read(path))
    args = Namespace(folder=folder, output=tmp_path / "out.csv", onnx=ONNX, batch_size=2, top_k=3, workers=2)

    assert batch.main(args) == (5, 0)
    assert list(read_rows(args.output)) == ["a/b/c.png", "a/z.png", "a b.png", "b.png", "c.png"]
    assert sorted(reads) == sorted(name.split("/")[-1] for name in names)

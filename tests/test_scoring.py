"""python -m scoring over real folders, lists and a file-system URI: nested images, broken files, odd
names and file types, one row each, in Parquet and CSV parts; what resume refuses."""

import csv
import os
import stat
import struct
import unicodedata
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model_store import image_bytes_to_input
from model_store.engine import OnnxClassifier, answer, top_k
from scoring import decoding, sources
from scoring.__main__ import get_args_parser, main
from scoring.parts import MANIFEST, OutputFolder
from scoring.results import CSV_COLUMNS, result_table
from scoring.sources import FolderSource
from tests.conftest import REPO, png_bytes, run_cli
from tests.tolerance import clear_top1, unsure_clear

ONNX = "model_store/default/fashion-lenet.onnx"


def score(source, output, *flags: str):
    """Run the scorer as a user would; a hang (a FIFO opened) fails the test instead of the session."""
    return run_cli("-m", "scoring", str(source), "--output", str(output), "--onnx", ONNX, *flags, timeout=120)


def score_here(source, output, *flags: str) -> dict:
    """The scorer in this process (decoding here too, so monkeypatches apply)."""
    args = get_args_parser().parse_args(
        [str(source), "--output", str(output), "--onnx", ONNX, "--workers", "0", *flags]
    )
    return main(args)


def parquet_rows(output) -> dict[bytes, dict]:
    """Every row of the output folder by id (the name's bytes), read as an analytics tool would."""
    rows = pq.read_table(output).to_pylist()
    by_id = {row["path_bytes"] or row["path"].encode(): row for row in rows}
    assert len(by_id) == len(rows), "one row per input"
    return by_id


def csv_rows(output) -> dict[str, dict]:
    rows = {}
    for part in sorted(output.glob("part-*.csv")):
        with open(part, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows.update({row["path"]: row for row in csv.DictReader(f)})
    return rows


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid 8x8 PNG with one extra chunk, CRC and all, right after IHDR."""
    png = png_bytes(np.zeros((8, 8), np.uint8))
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def test_tied_probabilities_rank_as_classify_ranks_them():
    """The scorer's rows and /classify's answers rank with one function: equal probabilities in
    class order, the same in both (the scorer used a stable sort of its own, /classify a reversed
    argsort, and ties came out in opposite orders)."""
    names = tuple("abcdef")
    probabilities = np.array([[0.1, 0.3, 0.1, 0.3, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]], np.float32)
    table = result_table(["x", "y"], [None, None], probabilities, None, names, 4).to_pylist()
    for row, p in zip(table, probabilities):
        answered = top_k(p, names, 4)
        assert [r["label"] for r in row["top_k"]] == [r["label"] for r in answered["top_k"]]
        assert row["label"] == answered["label"]
    assert [r["label"] for r in table[0]["top_k"]] == ["b", "d", "a", "c"]
    assert [r["label"] for r in table[1]["top_k"]] == ["a", "b", "c", "d"]


def test_scores_a_folder_reports_broken_files_and_keeps_going(tmp_path, fashion_test):
    from training.fashion_mnist_files import FASHION_MNIST_CLASSES

    images, labels = fashion_test
    folder = tmp_path / "photos"
    truth = {}
    for i in range(120):
        path = folder / f"class_{labels[i]}" / ("deep" if i % 3 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(images[i]))
        truth[path.relative_to(folder).as_posix().encode()] = FASHION_MNIST_CLASSES[labels[i]]
    Image.fromarray(images[200]).convert("RGB").resize((280, 280)).save(folder / "big.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(png_bytes(images[0])[:40])
    output = tmp_path / "out"

    result = score(folder, output, "--batch-size", "32", "--part-rows", "50", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "scored 121 of 123 inputs (2 failed;" in result.stdout
    rows = parquet_rows(output)
    assert len(rows) == 123
    assert "not a supported image" in rows[b"notes.txt"]["error"] and rows[b"notes.txt"]["label"] is None
    assert "truncated" in rows[b"broken.png"]["error"]
    assert rows[b"big.jpg"]["error"] is None and rows[b"big.jpg"]["label"] in FASHION_MNIST_CLASSES
    correct = sum(rows[name]["label"] == label for name, label in truth.items())
    assert correct / len(truth) >= 0.85
    ranked = rows[b"class_9/img0.png"]["top_k"]
    assert len(ranked) == 3 and ranked[0]["label"] == rows[b"class_9/img0.png"]["label"]
    assert ranked[0]["probability"] >= ranked[1]["probability"] >= ranked[2]["probability"]
    # the shipped model is calibrated: every scored row says whether it is unsure, a failed one says null
    assert {type(row["unsure"]) for name, row in rows.items() if row["error"] is None} == {bool}
    assert {row["unsure"] for row in rows.values() if row["error"] is not None} == {None}
    names = sorted(p.name for p in output.iterdir())
    assert names == [
        ".lock",
        MANIFEST,
        "part-0000-000000.parquet",
        "part-0000-000001.parquet",
        "part-0000-000002.parquet",
    ]


def test_a_calibrated_model_s_rows_say_unsure_as_classify_answers_in_parquet_and_csv(tmp_path, fashion_test, exported):
    classifier = OnnxClassifier(exported, device="cpu")
    assert classifier.card.calibration is not None, "the test export is calibrated on its held-out split"
    images = [png_bytes(image) for image in fashion_test[0][:150]]
    noise = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    images += [png_bytes(image) for image in noise]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(data)
    (folder / "broken.png").write_bytes(images[0][:40])
    # /classify's answer for each image: the service's preprocessing, engine and answer
    pixels = np.stack([image_bytes_to_input(data, classifier.card) for data in images])
    outcomes = classifier.outcomes(pixels)
    expected = {f"{i:03d}.png": answer(row, classifier.card, 3) for i, row in enumerate(outcomes.rows())}
    assert {got["unsure"] for got in expected.values()} == {True, False}  # both answers are checked
    # the scorer runs batches of 32: compared where neither the label nor unsure is a float tie
    clear = unsure_clear(outcomes, classifier.card.calibration) & clear_top1(outcomes.probabilities)
    ties = {name for name, is_clear in zip(expected, clear) if not is_clear}
    assert len(ties) <= len(expected) // 20

    flags = ("--onnx", str(exported), "--batch-size", "32", "--part-rows", "64")
    score_here(folder, tmp_path / "parquet", *flags)  # in this process
    result = score(folder, tmp_path / "csv", *flags, "--format", "csv", "--workers", "1")  # in a worker process
    assert result.returncode == 0, result.stderr
    rows = {name.decode(): row for name, row in parquet_rows(tmp_path / "parquet").items()}
    by_csv = csv_rows(tmp_path / "csv")
    assert set(rows) == set(by_csv) == {*expected, "broken.png"}
    for name, want in expected.items():
        if name in ties:
            continue
        in_parquet = rows[name]["label"], rows[name]["unsure"], rows[name]["unsure_reason"]
        assert in_parquet == (want["label"], want["unsure"], want["unsure_reason"]), name
        in_csv = by_csv[name]["unsure"], by_csv[name]["unsure_reason"]
        assert in_csv == ("true" if want["unsure"] else "false", want["unsure_reason"] or ""), name
    broken, broken_csv = rows["broken.png"], by_csv["broken.png"]
    assert broken["error"] and broken["unsure"] is None and broken["unsure_reason"] is None
    assert broken_csv["error"] and broken_csv["unsure"] == broken_csv["unsure_reason"] == ""


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_resume_refuses_parts_written_without_the_unsure_columns(tmp_path, fashion_test, fmt):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(fashion_test[0][i]))
    output = tmp_path / "out"
    score_here(folder, output, "--format", fmt)
    (part,) = output.glob("part-*")
    # the part as the scorer wrote it before it had the unsure columns
    if fmt == "parquet":
        pq.write_table(pq.read_table(part).drop_columns(["unsure", "unsure_reason"]), part)
    else:
        with open(part, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        old = [column for column in CSV_COLUMNS if not column.startswith("unsure")]
        with open(part, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, old, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    (folder / "3.png").write_bytes(png_bytes(fashion_test[0][3]))

    with pytest.raises(ValueError) as refused:
        score_here(folder, output, "--format", fmt, "--resume")
    message = str(refused.value)
    assert f"{part.name} was not written by this version of the scorer" in message
    assert "it lacks the columns unsure, unsure_reason" in message and "new --output folder" in message
    assert len(list(output.glob("part-*"))) == 1


def test_bad_arguments_fail_in_one_line(tmp_path):
    missing = score(tmp_path / "nope", tmp_path / "out")
    assert (
        missing.returncode == 2 and missing.stderr.strip().startswith("error: ") and "does not exist" in missing.stderr
    )
    bad_k = score(tmp_path, tmp_path / "out", "--top-k", "11")
    assert bad_k.returncode == 2 and "--top-k must be from 1 to 10" in bad_k.stderr
    unknown = run_cli(
        "-m",
        "scoring",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "no-such:v1",
        env={"BENTOML_HOME": str(tmp_path / "home")},
    )
    assert unknown.returncode == 2 and "not in the BentoML model store" in unknown.stderr
    assert not (tmp_path / "out").exists()


def test_a_crafted_or_random_file_costs_its_row_not_the_run(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(fashion_test[0][0]))
    (folder / "bad_exif.png").write_bytes(png_with_chunk(b"eXIf", b"this is not TIFF data"))
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(3000))

    assert score_here(folder, tmp_path / "out")["failed"] == 2
    rows = parquet_rows(tmp_path / "out")
    assert rows[b"good.png"]["error"] is None and rows[b"good.png"]["label"]
    assert rows[b"bad_exif.png"]["error"] and rows[b"bad_exif.png"]["label"] is None
    assert "not a supported image" in rows[b"random.png"]["error"]


def test_any_exception_from_decoding_costs_only_that_row(tmp_path, fashion_test, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    crash = png_bytes(fashion_test[0][0])
    (folder / "crash.png").write_bytes(crash)
    (folder / "good.png").write_bytes(png_bytes(fashion_test[0][1]))
    decode = decoding.image_bytes_to_input

    def decoder_with_a_bug(data, card):
        if data == crash:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return decode(data, card)

    monkeypatch.setattr(decoding, "image_bytes_to_input", decoder_with_a_bug)
    record = score_here(folder, tmp_path / "out", "--batch-size", "8")
    assert (record["scored"], record["failed"]) == (2, 1)
    rows = parquet_rows(tmp_path / "out")
    assert rows[b"crash.png"]["error"] == "struct.error: unpack requires a buffer of 4 bytes"
    assert rows[b"good.png"]["label"] and rows[b"good.png"]["error"] is None


ODD_NAMES = [
    "=cmd.png",
    "+x.png",
    "-y.png",
    "@z.png",
    "\tt.png",
    "'quoted.png",
    "a,b.png",
    'say "cheese".png',
    "two\nlines.png",
    "cr\rhere.png",
    "日本語 ラベル.png",
    "emoji 🧥.png",
    unicodedata.normalize("NFC", "café.png"),
    unicodedata.normalize("NFD", "café.png"),  # a different name on disk from the NFC one
    "plain.png",
]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_every_name_round_trips_and_none_becomes_a_formula(tmp_path, fashion_test, fmt, uncalibrated):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = png_bytes(fashion_test[0][0])
    for name in ODD_NAMES:
        (folder / name).write_bytes(image)
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:  # not valid UTF-8
        f.write(image)
    expected = {name.encode() for name in ODD_NAMES} | {b"bad\xff.png"}

    # a model without calibration (the last --onnx wins): its rows' unsure columns are null
    flags = ("--format", fmt, "--part-rows", "5", "--workers", "1", "--onnx", str(uncalibrated))
    result = score(folder, tmp_path / "out", *flags)
    assert result.returncode == 0, result.stderr
    assert f"scored {len(expected)} of {len(expected)} inputs (0 failed;" in result.stdout
    if fmt == "parquet":
        rows = parquet_rows(tmp_path / "out")
        assert set(rows) == expected
        assert rows[b"bad\xff.png"]["path"] == "bad\ufffd.png"  # readable, and exact in path_bytes
        assert rows[b"plain.png"]["path_bytes"] is None
        assert {(row["unsure"], row["unsure_reason"]) for row in rows.values()} == {(None, None)}
    else:
        raw = b"".join(part.read_bytes() for part in (tmp_path / "out").glob("part-*.csv"))
        assert b"bad\xff.png" in raw  # the name's bytes on disk, as they are
        rows = csv_rows(tmp_path / "out")
        starts = ("=", "+", "-", "@", "\t", "'")
        assert {f"'{n}" if n.startswith(starts) else n for n in ODD_NAMES} | {os.fsdecode(b"bad\xff.png")} == set(rows)
        assert {(row["unsure"], row["unsure_reason"]) for row in rows.values()} == {("", "")}  # null: empty cells
    assert all(row["label"] and not row["error"] for row in rows.values())


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

    result = score(folder, tmp_path / "out", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "scored 2 of 9 inputs (7 failed; 2 hidden entries skipped)" in result.stdout
    rows = {name.decode(): row for name, row in parquet_rows(tmp_path / "out").items()}
    assert sorted(rows) == [
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
    assert rows["inside.png"]["label"] == rows["sub/good.png"]["label"] is not None
    assert "leads outside the folder" in rows["outside.png"]["error"] and rows["outside.png"]["label"] is None
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
    entries = list(FolderSource(str(tmp_path)).entries())
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
        result = score(folder, tmp_path / "out")
    finally:
        (folder / "locked").chmod(0o700)
    assert result.returncode == 0, result.stderr
    rows = parquet_rows(tmp_path / "out")
    assert "Permission denied" in rows[b"locked.png"]["error"]
    assert "cannot list folder" in rows[b"locked"]["error"] and "Permission denied" in rows[b"locked"]["error"]


def test_each_file_is_read_once(tmp_path, fashion_test, monkeypatch):
    folder = tmp_path / "photos"
    names = ["b.png", "a/z.png", "a/b/c.png", "a b.png", "c.png"]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png_bytes(fashion_test[0][i]))
    reads = []
    read = sources.read_regular_file
    monkeypatch.setattr(sources, "read_regular_file", lambda path: reads.append(path) or read(path))

    assert score_here(folder, tmp_path / "out", "--batch-size", "2")["scored"] == 5
    assert set(parquet_rows(tmp_path / "out")) == {name.encode() for name in names}
    assert sorted(reads) == sorted(str(folder / name) for name in names)


def test_a_list_of_paths_gets_a_row_per_line(tmp_path, fashion_test, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(png_bytes(fashion_test[0][0]))
    (tmp_path / "elsewhere.png").write_bytes(png_bytes(fashion_test[0][1]))
    (photos / "link.png").symlink_to(tmp_path / "elsewhere.png")  # a list names what to read: followed
    os.mkfifo(photos / "fifo.png")
    lines = ["photos/a.png", str(tmp_path / "elsewhere.png"), "photos/link.png", "photos/missing.png", "photos"]
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join([*lines[:2], "", *lines[2:], "photos/fifo.png"]) + "\n")

    monkeypatch.chdir(tmp_path)  # relative lines are relative to the current folder, as find writes them
    record = score_here(listing, tmp_path / "out", "--onnx", str(REPO / ONNX))
    assert (record["scored"], record["failed"]) == (6, 3)
    rows = {name.decode(): row for name, row in parquet_rows(tmp_path / "out").items()}
    assert sorted(rows) == sorted([*lines, "photos/fifo.png"])
    assert rows["photos/link.png"]["label"] == rows[str(tmp_path / "elsewhere.png")]["label"] is not None
    assert "No such file" in rows["photos/missing.png"]["error"]
    assert "a folder" in rows["photos"]["error"]
    assert "not a regular file but a FIFO" in rows["photos/fifo.png"]["error"]


def test_a_uri_goes_through_pyarrow_fs_and_scores_like_the_folder(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    for i in range(12):
        path = folder / f"d{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(fashion_test[0][i]))
    (folder / ".hidden.png").write_bytes(png_bytes(fashion_test[0][20]))

    from_uri = score_here(f"file://{folder}", tmp_path / "by-uri")
    score_here(folder, tmp_path / "by-folder")
    assert (from_uri["scored"], from_uri["hidden"]) == (12, 1)
    by_uri, by_folder = parquet_rows(tmp_path / "by-uri"), parquet_rows(tmp_path / "by-folder")
    assert {k: v["label"] for k, v in by_uri.items()} == {k: v["label"] for k, v in by_folder.items()}


def test_the_first_part_is_written_before_the_listing_ends(tmp_path, fashion_test, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i}.png").write_bytes(png_bytes(fashion_test[0][i]))
    output = tmp_path / "out"
    parts_when_listed = []

    class Watched(FolderSource):
        def entries(self):
            yield from super().entries()
            parts_when_listed.append(len(list(output.glob("part-*"))))

    monkeypatch.setattr("scoring.__main__.open_source", Watched)
    record = score_here(folder, output, "--batch-size", "8", "--part-rows", "8")
    assert record["parts"] == 25
    assert parts_when_listed[0] >= 20  # all but the batches in flight were written while listing


def test_resume_refuses_other_settings_and_a_busy_or_foreign_folder(tmp_path, fashion_test):
    onnx = pytest.importorskip("onnx")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(fashion_test[0][0]))
    output = tmp_path / "out"
    assert score(folder, output).returncode == 0

    again = score(folder, output)
    assert again.returncode == 2 and "already holds a scoring run" in again.stderr and "--resume" in again.stderr
    other_k = score(folder, output, "--resume", "--top-k", "2")
    assert other_k.returncode == 2 and "top_k was 3 and is now 2" in other_k.stderr
    other_format = score(folder, output, "--resume", "--format", "csv")
    assert "format was 'parquet' and is now 'csv'" in other_format.stderr
    other_source = score(tmp_path, output, "--resume")
    assert "source was 'folder " in other_source.stderr
    retrained = onnx.load(ONNX)
    retrained.doc_string = "another model"
    onnx.save(retrained, tmp_path / "other.onnx")
    other_model = run_cli(
        "-m", "scoring", str(folder), "--output", str(output), "--onnx", str(tmp_path / "other.onnx"), "--resume"
    )
    assert other_model.returncode == 2 and "model_sha256 was" in other_model.stderr
    assert "the run's model: lenet_bn from" in other_model.stderr

    busy = OutputFolder(output)
    busy._lock()  # as another scorer at work would
    try:
        locked = score(folder, output, "--resume")
    finally:
        busy._lock_file.close()
    assert locked.returncode == 2 and "another scorer is writing to" in locked.stderr
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    foreign = score(folder, tmp_path / "home")
    assert foreign.returncode == 2 and "is not empty and holds no scoring run" in foreign.stderr
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
    (output / MANIFEST).write_text("{broken")  # changed by hand: the scorer only ever renames it whole
    damaged = score(folder, output, "--resume")
    assert damaged.returncode == 2 and len(damaged.stderr.strip().splitlines()) == 1
    assert f"{output / MANIFEST} is not a scoring manifest" in damaged.stderr


def test_the_ray_engine_without_ray_says_how_to_install_it(tmp_path):
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    result = run_cli(
        "-m",
        "scoring",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--onnx",
        ONNX,
        "--engine",
        "ray",
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--engine ray needs Ray, which is not installed" in result.stderr and "[scale]" in result.stderr
    assert not (tmp_path / "out").exists()

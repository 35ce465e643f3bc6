"""The Ray Data engine, run for real on a local Ray instance with 2 CPUs: its rows equal the local
engine's on a few hundred real Fashion-MNIST PNGs (and on the inputs that fail), unsure answers of
a calibrated model included, and it resumes a run from the parts another engine wrote."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from model_store import image_bytes_to_input
from model_store.engine import OnnxClassifier
from scoring.__main__ import get_args_parser, main
from scoring.parts import MANIFEST
from tests.conftest import png_bytes
from tests.tolerance import PROB_ATOL, clear_top1, ranks_clear, unsure_clear

ONNX = "model_store/default/fashion-lenet.onnx"


@pytest.fixture(scope="module")
def ray_local():
    """One Ray instance for the module: starting one costs seconds."""
    try:
        import ray
    except ImportError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Ray (the [test] extra installs it): {err}")
        pytest.skip(f"Ray is not installed: {err}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, fashion_test):
    folder = tmp_path_factory.mktemp("ray") / "photos"
    for i in range(300):
        path = folder / f"class_{fashion_test[1][i]}" / f"img {i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(fashion_test[0][i]))
    (folder / "notes.txt").write_text("not an image")
    with open(os.path.join(os.fsencode(folder), b'bad\xff, "name".png'), "wb") as f:
        f.write(png_bytes(fashion_test[0][300]))
    os.mkfifo(folder / "fifo.png")
    (folder / "outside.png").symlink_to(folder.parent)
    return folder


def run(source, output, *flags: str) -> dict:
    args = [str(source), "--output", str(output), "--onnx", ONNX, "--batch-size", "32", "--part-rows", "64", *flags]
    return main(get_args_parser().parse_args(args))


def rows_by_id(output) -> dict[bytes, dict]:
    rows = pq.read_table(output).to_pylist()
    by_id = {row["path_bytes"] or row["path"].encode(): row for row in rows}
    assert len(by_id) == len(rows), "a path scored twice"
    return by_id


def ties(folder: Path, onnx: str) -> set[bytes]:
    """The images of ``folder`` whose label or unsure decision is a float tie for ``onnx``: two
    engines that batch them differently may decide those either way (tests/tolerance.py)."""
    classifier = OnnxClassifier(onnx, device="cpu")
    paths = sorted(p for p in folder.rglob("*.png") if p.is_file() and not p.is_symlink())  # no FIFO, no link
    outcomes = classifier.outcomes(np.stack([image_bytes_to_input(p.read_bytes(), classifier.card) for p in paths]))
    clear = clear_top1(outcomes.probabilities)
    if classifier.card.calibration is not None:
        clear &= unsure_clear(outcomes, classifier.card.calibration)
    return {os.fsencode(path.relative_to(folder)) for path, is_clear in zip(paths, clear) if not is_clear}


def assert_same_rows(got: dict, expected: dict, ties: set[bytes] = frozenset()) -> None:
    """The same rows; the same labels and unsure answers but for the ``ties``, probabilities within tolerance."""
    assert set(got) == set(expected) and len(ties) <= len(expected) // 20
    for key, row in expected.items():
        other = got[key]
        assert (other["path"], other["error"]) == (row["path"], row["error"]), key
        if key in ties:
            continue
        assert other["label"] == row["label"], key
        assert (other["unsure"], other["unsure_reason"]) == (row["unsure"], row["unsure_reason"]), key
        if row["error"] is None:
            probabilities = [r["probability"] for r in row["top_k"]]
            clear = ranks_clear(probabilities)
            assert [r["label"] for r, c in zip(other["top_k"], clear) if c] == [
                r["label"] for r, c in zip(row["top_k"], clear) if c
            ], key
            assert np.allclose(sorted(r["probability"] for r in other["top_k"]), sorted(probabilities), atol=PROB_ATOL)


@pytest.fixture(scope="module")
def local_output(tmp_path_factory, photos):
    output = tmp_path_factory.mktemp("local") / "out"
    run(photos, output, "--workers", "0")
    return output


def test_ray_rows_equal_the_local_engines(ray_local, photos, local_output, tmp_path):
    record = run(photos, tmp_path / "ray", "--engine", "ray")
    assert (record["scored"], record["failed"], record["provider"]) == (304, 3, "CPUExecutionProvider")
    expected, got = rows_by_id(local_output), rows_by_id(tmp_path / "ray")
    assert_same_rows(got, expected, ties(photos, ONNX))
    assert got[b'bad\xff, "name".png']["label"] and "leads outside the folder" in got[b"outside.png"]["error"]
    assert "not a regular file but a FIFO" in got[b"fifo.png"]["error"]
    assert not [p.name for p in (tmp_path / "ray").iterdir() if p.name.endswith(".tmp")]


def test_ray_answers_unsure_as_the_local_engine_does_for_a_calibrated_model(ray_local, photos, exported, tmp_path):
    run(photos, tmp_path / "local", "--onnx", str(exported), "--workers", "0")
    run(photos, tmp_path / "ray", "--onnx", str(exported), "--engine", "ray")
    expected, got = rows_by_id(tmp_path / "local"), rows_by_id(tmp_path / "ray")
    assert_same_rows(got, expected, ties(photos, str(exported)))
    assert {row["unsure"] for row in got.values()} == {True, False, None}  # None: the inputs that failed


def test_ray_resumes_a_run_from_its_finished_parts(ray_local, photos, local_output, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(local_output, output)
    lost = sorted(output.glob("part-*"))[1::2]  # as if killed before these parts were written
    lost_rows = sum(pq.read_metadata(part).num_rows for part in lost)
    for part in lost:
        part.unlink()

    record = run(photos, output, "--engine", "ray", "--resume")
    assert record["scored"] == lost_rows and record["skipped"] == 304 - lost_rows
    assert_same_rows(rows_by_id(output), rows_by_id(local_output), ties(photos, ONNX))
    manifest = json.loads((output / MANIFEST).read_text())
    assert [r["engine"] for r in manifest["runs"]] == ["local", "ray"] and manifest["rows"] == 304

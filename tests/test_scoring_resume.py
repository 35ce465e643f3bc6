"""A scoring run SIGKILLed at random points, again and again, then resumed, ends with exactly the rows
of an uninterrupted run; at no point does the output folder show a half-written file."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from scoring.parts import MANIFEST, PART
from tests.conftest import REPO, png_bytes, run_cli

ONNX = "model_store/default/fashion-lenet.onnx"
# The scorer with each part write slowed by 20 ms, so that a run lasts long enough to be killed in
# the middle; the knob lives here, not in the scorer.
SLOW_SCORER = """
import sys, time
from scoring import local
write = local.write_part
local.write_part = lambda *args: (time.sleep(0.02), write(*args))[1]
from scoring.__main__ import cli
sys.exit(cli(sys.argv[1:]))
"""


def rows_by_id(output) -> dict[bytes, dict]:
    rows = pq.read_table(output).to_pylist()
    by_id = {row["path_bytes"] or row["path"].encode(): row for row in rows}
    assert len(by_id) == len(rows), "a path scored twice"
    return by_id


def assert_no_half_written_file(output) -> None:
    """Every file a reader would see is whole: the manifest parses and every part reads."""
    for path in output.iterdir():
        if path.name.startswith("."):
            continue  # the lock, and the temp file of a part killed while being written
        if path.name == MANIFEST:
            json.loads(path.read_text())
        else:
            assert PART.fullmatch(path.name), path.name
            pq.read_table(path)


def test_killed_at_random_points_and_resumed_it_ends_with_the_rows_of_a_clean_run(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    for i in range(240):
        path = folder / f"d{i % 4}" / f"img {i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(fashion_test[0][i]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    os.mkfifo(folder / "fifo.png")
    flags = ["--onnx", ONNX, "--part-rows", "8", "--batch-size", "4", "--workers", "1"]
    clean = run_cli("-m", "scoring", str(folder), "--output", str(tmp_path / "clean"), *flags, timeout=120)
    assert clean.returncode == 0, clean.stderr

    output = tmp_path / "resumed"
    command = [sys.executable, "-c", SLOW_SCORER, str(folder), "--output", str(output), *flags, "--resume"]
    rng = random.Random(15)
    kills = 0
    for attempt in range(8):
        parts_before = len(parts(output))
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 1.0))  # while starting: before, during or after the manifest
        else:  # while scoring: once this run has written a part, somewhere in the next 0.4 s
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline and len(parts(output)) == parts_before:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            break  # it finished first
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        kills += 1
        if output.exists():
            assert_no_half_written_file(output)
        if kills == 5:
            break
    else:
        raise AssertionError("the runs never finished")
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert kills >= 4
    runs = {int(PART.fullmatch(p.name)[1]) for p in output.glob("part-*")}
    assert len(runs) >= 4, f"parts from only {len(runs)} runs: the kills did not land mid-run"

    assert_no_half_written_file(output)
    assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]
    expected, got = rows_by_id(tmp_path / "clean"), rows_by_id(output)
    assert set(got) == set(expected) and len(got) == 242
    for key, row in expected.items():
        assert (got[key]["label"], got[key]["error"]) == (row["label"], row["error"]), key
        assert np.isclose(got[key]["probability"] or 0, row["probability"] or 0, atol=1e-6)
    manifest = json.loads((output / MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == 242 and manifest["failed"] == 2
    assert sum(run.get("scored", 0) for run in manifest["runs"]) <= 242  # killed runs record nothing


def parts(output) -> list:
    return list(output.glob("part-*")) if output.exists() else []

"""A scoring run SIGKILLed at each kind of point, again and again, then resumed, ends with exactly the
rows of an uninterrupted run; at no point does the output folder show a half-written file.

The test, not the clock, decides where each kill lands: the scorer under test stops at every point
where a kill leaves a different folder behind (before the manifest, before a part, with a part's
temp file written but not renamed, before the run is marked complete), says where it is on a pipe
and goes on only when the test tells it to. So the same kills land at the same points on any
machine, however fast, busy or pinned to one core.
"""

import json
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from scoring.parts import MANIFEST, PART
from tests.conftest import REPO, png_bytes, run_cli

pytestmark = pytest.mark.processes

ONNX = "model_store/default/fashion-lenet.onnx"
IMAGES = 240
ROWS = IMAGES + 2  # the broken PNG and the FIFO get a row each
PART_ROWS = 8
# The scorer with a gate at each point where a kill matters: it writes the point's name to the
# file descriptor in $GATE_FD and waits for a line on stdin before going on. The gates live here,
# not in the scorer.
GATED_SCORER = """
import os, sys
from model_store import files
from scoring import local, parts

events = os.fdopen(int(os.environ["GATE_FD"]), "w", buffering=1)

def gate(point):
    events.write(point + "\\n")
    if not sys.stdin.readline():
        sys.exit("the test went away")

write_manifest, write_part, replace = parts.OutputFolder._write_manifest, local.write_part, files.os.replace

def gated_manifest(self):
    gate("complete" if self._manifest["complete"] else "manifest")
    write_manifest(self)

def gated_part(path, *args):
    gate("write " + path.name)
    write_part(path, *args)

def gated_replace(source, target):
    if parts.PART.fullmatch(os.path.basename(target)):
        gate("rename " + os.path.basename(target))
    replace(source, target)

parts.OutputFolder._write_manifest, local.write_part, files.os.replace = gated_manifest, gated_part, gated_replace
from scoring.__main__ import cli
sys.exit(cli(sys.argv[1:]))
"""
EVENT_TIMEOUT_S = 120  # a generous bound on one step of a scorer (start-up included), never reached normally


class GatedScorer:
    """One run of the gated scorer: ``next_point()`` is where it now waits, ``go()`` lets it on."""

    def __init__(self, command: list[str]):
        read, write = os.pipe()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "GATE_FD": str(write)},
            pass_fds=(write,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write)
        self.events = os.fdopen(read)

    def next_point(self) -> str | None:
        """The point the scorer waits at, or None once it has exited."""
        ready, _, _ = select.select([self.events], [], [], EVENT_TIMEOUT_S)
        assert ready, f"the scorer reached no gate within {EVENT_TIMEOUT_S} s"
        return self.events.readline().strip() or None

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self) -> subprocess.CompletedProcess:
        stdout, stderr = self.process.communicate(timeout=EVENT_TIMEOUT_S)  # closes stdin: a waiting gate exits
        self.events.close()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)


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


def part_files(output) -> list[str]:
    return sorted(p.name for p in output.glob("part-*")) if output.exists() else []


def temp_files(output) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.name.endswith(".tmp")) if output.exists() else []


# Each start of the scorer is killed at one point: (what it waits at, how many times it got there before).
KILLS = [
    ("manifest", 0),  # while starting: the folder holds its lock and nothing else, so no run is recorded
    ("write", 0),  # run 0 is in the manifest; no part yet
    ("rename", 3),  # three parts written, the fourth whole in its temp file but not renamed
    ("write", 2),  # two parts written, the third's rows in memory
    ("complete", 0),  # every row written; the manifest does not say complete yet
]


def test_killed_at_each_kind_of_point_and_resumed_it_ends_with_the_rows_of_a_clean_run(tmp_path, fashion_test):
    folder = tmp_path / "photos"
    for i in range(IMAGES):
        path = folder / f"d{i % 4}" / f"img {i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(fashion_test[0][i]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    os.mkfifo(folder / "fifo.png")
    flags = ["--onnx", ONNX, "--part-rows", str(PART_ROWS), "--batch-size", "4", "--workers", "1"]
    clean = run_cli("-m", "scoring", str(folder), "--output", str(tmp_path / "clean"), *flags, timeout=120)
    assert clean.returncode == 0, clean.stderr

    output = tmp_path / "resumed"
    command = [sys.executable, "-c", GATED_SCORER, str(folder), "--output", str(output), *flags, "--resume"]
    killed_at = []
    for start, (kind, passed) in enumerate(KILLS):
        scorer, seen = GatedScorer(command), 0
        while (point := scorer.next_point()) is not None:
            if point.split()[0] == kind:
                if seen == passed:
                    break
                seen += 1
            scorer.go()
        assert point is not None, f"start {start} ended before reaching {kind} #{passed}: {scorer.finish().stderr}"
        if kind == "rename":  # the part is whole on disk under its hidden temp name
            assert len(temp_files(output)) == 1, temp_files(output)
        scorer.kill()
        killed_at.append(point)
        assert_no_half_written_file(output)
    assert killed_at == [
        "manifest",
        "write part-0000-000000.parquet",
        "rename part-0001-000003.parquet",
        "write part-0002-000002.parquet",
        "complete",
    ]

    last = GatedScorer(command)  # every gate opened: it runs to the end
    while last.next_point() is not None:
        last.go()
    done = last.finish()
    assert done.returncode == 0, done.stderr
    assert f"{ROWS} already scored" in done.stdout  # the killed run 3 had written every row
    # Which run wrote which parts says where each kill landed: runs 1 and 2 lost the part they were
    # filling, run 3 wrote the rest, the last run nothing.
    runs = [int(PART.fullmatch(name)[1]) for name in part_files(output)]
    rest = -(-(ROWS - 5 * PART_ROWS) // PART_ROWS)
    assert {run: runs.count(run) for run in set(runs)} == {1: 3, 2: 2, 3: rest}
    assert temp_files(output) == []  # the killed rename's temp file was removed when the next run started

    assert_no_half_written_file(output)
    expected, got = rows_by_id(tmp_path / "clean"), rows_by_id(output)
    assert set(got) == set(expected) and len(got) == ROWS
    for key, row in expected.items():
        assert (got[key]["label"], got[key]["error"]) == (row["label"], row["error"]), key
        assert np.isclose(got[key]["probability"] or 0, row["probability"] or 0, atol=1e-6)
    manifest = json.loads((output / MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == ROWS and manifest["failed"] == 2
    assert [run["finished"] is not None for run in manifest["runs"]] == [False] * 4 + [True]
    assert manifest["runs"][-1]["scored"] == 0  # killed runs record nothing; the last had nothing left to score

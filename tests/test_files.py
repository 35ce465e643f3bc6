"""model_store.files.atomic_output: the temp files a killed writer leaves behind are cleaned up, and only those."""

import subprocess
import sys

from model_store.files import atomic_output


def test_atomic_output_removes_temp_files_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # waited for and reaped: no process has this PID now
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )  # until killed
    try:
        target = tmp_path / "per_class.csv"
        stale = tmp_path / f".per_class.csv.{dead_pid}.tmp"
        writing = tmp_path / f".per_class.csv.{live.pid}.tmp"
        others = [tmp_path / f".other.csv.{dead_pid}.tmp", tmp_path / ".per_class.csv.0.tmp", tmp_path / "notes.tmp"]
        for path in [stale, writing, *others]:
            path.write_text("partial")

        with atomic_output(target, "w") as f:
            f.write("new")

        assert target.read_text() == "new"
        assert not stale.exists()
        assert writing.read_text() == "partial"  # a running process's file is never touched
        assert all(path.read_text() == "partial" for path in others)
    finally:
        live.kill()
        live.wait()

"""benchmarks/gpu/wheel_parts.py: a real (tiny) wheel split, carried, joined, checked and installed into a
folder of its own, through the command line the GPU machine runs; damaged and missing parts refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def wheel_parts(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.gpu.wheel_parts", *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def tiny_wheel(folder: Path) -> Path:
    """tinypkg 1.0: a module, and 3 MB of incompressible data so that it splits into parts."""
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg/blob.bin": np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes(),
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tinypkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return path


def test_a_wheel_travels_in_parts_and_installs_beside_the_machines_own_packages(tmp_path):
    wheel = tiny_wheel(tmp_path)
    split = wheel_parts("split", str(wheel), "--out", str(tmp_path / "parts"), "--part-mb", "1")
    assert split.returncode == 0, split.stderr
    parts = sorted((tmp_path / "parts").glob("*.part[0-9]*"))
    assert len(parts) == 4 and all(p.stat().st_size <= 2**20 for p in parts)
    carried = tmp_path / "there"  # what the device machine receives, one part per command
    carried.mkdir()
    for path in (tmp_path / "parts").iterdir():
        shutil.copy(path, carried / path.name)
    installed = wheel_parts("install", str(carried), "--target", str(tmp_path / "ort"))
    assert installed.returncode == 0, installed.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import tinypkg; print(tinypkg.VALUE, tinypkg.__file__)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "ort")},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split()[0] == "42" and probe.stdout.split()[1].startswith(str(tmp_path / "ort"))


def test_a_damaged_or_missing_part_is_refused_naming_it(tmp_path):
    wheel = tiny_wheel(tmp_path)
    assert wheel_parts("split", str(wheel), "--out", str(tmp_path / "parts"), "--part-mb", "1").returncode == 0
    damaged = tmp_path / "parts" / f"{wheel.name}.part02"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = wheel_parts("join", str(tmp_path / "parts"), "--out", str(tmp_path / "joined"))
    assert result.returncode == 2 and result.stderr.startswith(f"error: part {damaged} is damaged")
    assert not (tmp_path / "joined" / wheel.name).exists()  # nothing half-written
    damaged.unlink()
    result = wheel_parts("install", str(tmp_path / "parts"), "--target", str(tmp_path / "ort"))
    assert result.returncode == 2 and f"part {damaged} is missing (4 parts in all)" in result.stderr


def test_the_interpreters_own_package_folder_is_refused_as_a_target(tmp_path):
    import sysconfig

    wheel = tiny_wheel(tmp_path)
    assert wheel_parts("split", str(wheel), "--out", str(tmp_path / "parts")).returncode == 0
    result = wheel_parts("install", str(tmp_path / "parts"), "--target", sysconfig.get_paths()["purelib"])
    assert result.returncode == 2 and "is this Python's own package folder" in result.stderr

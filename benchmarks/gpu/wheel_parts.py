"""Carry a wheel too large for one device command in parts, and install it there beside, never over,
the machine's own packages.

Here (with the package registry):

    pip download onnxruntime-gpu==1.31.1 --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 -d wheels/
    python -m benchmarks.gpu.wheel_parts split wheels/onnxruntime_gpu-*.whl --out .gpu/parts

There, after each part has arrived (one command per part, each copying its part to /tmp/parts):

    python -m benchmarks.gpu.wheel_parts install /tmp/parts --target /tmp/ort-gpu
    PYTHONPATH=/tmp/ort-gpu python -c "import onnxruntime as o; print(o.get_available_providers())"

``split`` writes ``NAME.partNN`` files of at most ``--part-mb`` MiB and ``NAME.parts.json``: the
wheel's and each part's SHA-256 and size. ``install`` joins them in order, checks every part and
the whole before anything is written, then runs ``pip install --no-deps --target`` into a folder
of its own; it refuses a target that is one of the interpreter's own package folders. Every
failure is one line naming the part or the path, and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from model_store.files import atomic_output, file_sha256

MIB = 2**20


def split(wheel: Path, out: Path, part_bytes: int) -> list[Path]:
    """``wheel`` -> its parts and manifest in ``out``; returns the parts' paths, in order."""
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise ValueError(f"{wheel} is not a wheel file")
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(wheel, "rb") as source:
        while chunk := source.read(part_bytes):
            path = out / f"{wheel.name}.part{len(parts):02d}"
            with atomic_output(path) as f:
                f.write(chunk)
            parts.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "sha256": file_sha256(wheel), "parts": parts}
    with atomic_output(out / f"{wheel.name}.parts.json", "w") as f:
        json.dump(manifest, f, indent=1)
    return [out / part["file"] for part in parts]


def join(folder: Path, out: Path) -> Path:
    """The wheel rebuilt from the parts in ``folder`` into ``out``, every part and the whole checked."""
    manifests = sorted(folder.glob("*.parts.json"))
    if len(manifests) != 1:
        raise ValueError(f"{folder} must hold exactly one *.parts.json manifest, found {len(manifests)}")
    manifest = json.loads(manifests[0].read_text())
    whole = hashlib.sha256()
    target = out / manifest["wheel"]
    with atomic_output(target) as f:
        for part in manifest["parts"]:
            path = folder / part["file"]
            if not path.is_file():
                raise ValueError(f"part {path} is missing ({len(manifest['parts'])} parts in all)")
            data = path.read_bytes()
            if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ValueError(f"part {path} is damaged: {len(data):,} bytes, SHA-256 differs from the manifest's")
            whole.update(data)
            f.write(data)
        if whole.hexdigest() != manifest["sha256"]:
            raise ValueError(f"the joined {manifest['wheel']} does not match the manifest's SHA-256")
    return target


def install(folder: Path, target: Path) -> Path:
    """Join the parts and ``pip install --no-deps --target target``; returns ``target``."""
    own = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    if target.resolve() in own:
        raise ValueError(f"--target {target} is this Python's own package folder; give a folder of its own")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = join(folder, Path(tmp))
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        result = subprocess.run([*command, "--target", str(target), str(wheel)], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ValueError(f"pip could not install {wheel.name} into {target}: {last}")
    return target


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheel_parts", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    splitting = commands.add_parser("split", help="a wheel -> parts and a manifest")
    splitting.add_argument("wheel", type=Path)
    splitting.add_argument("--out", type=Path, required=True, help="folder for the parts")
    splitting.add_argument("--part-mb", type=float, default=60, help="largest part, MiB (default: 60)")
    joining = commands.add_parser("join", help="parts -> the wheel, checked")
    joining.add_argument("parts", type=Path, help="folder holding the parts and their manifest")
    joining.add_argument("--out", type=Path, required=True, help="folder for the wheel")
    installing = commands.add_parser("install", help="join, check, and pip install --no-deps --target")
    installing.add_argument("parts", type=Path, help="folder holding the parts and their manifest")
    installing.add_argument("--target", type=Path, required=True, help="a folder of its own, put on PYTHONPATH")
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "split":
            if args.part_mb <= 0:
                raise ValueError(f"--part-mb must be positive, got {args.part_mb}")
            parts = split(args.wheel, args.out, int(args.part_mb * MIB))
            print(f"{args.wheel.name}: {len(parts)} parts in {args.out}")
        elif args.command == "join":
            print(f"joined and checked {join(args.parts, args.out)}")
        else:
            print(f"installed into {install(args.parts, args.target)}; run with PYTHONPATH={args.target}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

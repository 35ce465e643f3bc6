"""What an image's Python environment must hold, checked inside the image build (deploy/Containerfile).

Exactly one ONNX Runtime distribution (``onnxruntime`` and ``onnxruntime-gpu`` overwrite each other's
files) and no torch. For ``onnxruntime-gpu``, every shared library its CUDA provider links to must be
found: the CUDA and cuDNN libraries come from the nvidia-* wheels its ``[cuda,cudnn]`` extras install,
so their folders are written to a dynamic-loader config (``--write-ld-conf``), and ``ldd`` must resolve
everything the provider and those libraries link to but the driver. Exit status 1 with one line per problem; standard library only, since it
runs in the image's own interpreter.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

RUNTIMES = ("onnxruntime", "onnxruntime-gpu")
FORBIDDEN = ("torch", "torchvision")
PROVIDER = "capi/libonnxruntime_providers_cuda.so"
# The driver's library is the host's: the NVIDIA container toolkit mounts it into the container at
# run time, so an image never holds it and a build machine without a GPU cannot resolve it.
FROM_THE_HOST = ("libcuda.so.1",)


def installed() -> set[str]:
    return {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}


def cuda_library_dirs(site: Path) -> list[Path]:
    """The lib folders of the nvidia-* wheels (nvidia/cu13/lib, nvidia/cudnn/lib, ...)."""
    return sorted(p for p in (site / "nvidia").glob("*/lib") if p.is_dir())


def missing_libraries(provider: Path, library_dirs: list[Path]) -> list[str]:
    """Names ``ldd`` cannot resolve for ``provider``, with ``library_dirs`` on the search path."""
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(map(str, library_dirs))}
    out = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, env=env, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def problems(ld_conf: Path | None) -> list[str]:
    names = installed()
    found = [r for r in RUNTIMES if r in names]
    errors = [f"{name} is installed; the serving image is torch-free" for name in FORBIDDEN if name in names]
    if len(found) != 1:
        errors.append(f"exactly one of {', '.join(RUNTIMES)} must be installed, found: {', '.join(found) or 'none'}")
    library_dirs: list[Path] = []
    if found == ["onnxruntime-gpu"]:
        import onnxruntime

        package = Path(onnxruntime.__file__).parent
        provider = package / PROVIDER
        library_dirs = cuda_library_dirs(package.parent)
        if not provider.is_file():
            errors.append(f"onnxruntime-gpu has no CUDA provider at {provider}")
        elif not library_dirs:
            errors.append("no nvidia-* CUDA wheels: install onnxruntime-gpu with its [cuda,cudnn] extras")
        else:
            # The provider links CUDA itself and loads cuDNN when a session starts: both, and what
            # each of their libraries links to, must resolve.
            libraries = [provider, *(p for d in library_dirs for p in sorted(d.glob("lib*.so*")))]
            if not any(p.name.startswith("libcudnn.so") for p in libraries):
                errors.append("no cuDNN among the CUDA wheels: install onnxruntime-gpu with its [cudnn] extra")
            for library in libraries:
                missing = [m for m in missing_libraries(library, library_dirs) if m not in FROM_THE_HOST]
                errors += [f"{library.name} needs {m}, which no installed wheel provides" for m in missing]
    if ld_conf is not None:
        ld_conf.write_text("".join(f"{d}\n" for d in library_dirs))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-ld-conf", type=Path, help="write the CUDA wheels' library folders here")
    args = parser.parse_args()
    errors = problems(args.write_ld_conf)
    for error in errors:
        print(f"check_image: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"check_image: {', '.join(r for r in RUNTIMES if r in installed())} installed, no torch")


if __name__ == "__main__":
    main()

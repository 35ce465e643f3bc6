"""Build the service's container image from its bento: `make image` (CPU) and `make image-gpu`.

    python -m deploy.image [--gpu] [--base-image python:3.11-slim] [--tag classic-cnns:cpu]

1. `bentoml build` the bento (bentofile.yaml, or bentofile.gpu.yaml) with the models SERVING_MODELS
   names, and `bentoml export` it, models included, into the build context;
2. download every wheel its requirements need, on the host, for the base image's Python and glibc
   (the build itself needs no network, no package index and no proxy certificate);
3. build deploy/Containerfile with podman or docker (ENGINE=... to choose), on BASE_IMAGE when given,
   else on a Debian base made from Debian packages with mmdebstrap (no container registry needed).

The context is left in build/image/<flavour>/ for anyone who wants to see what went in.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "deploy" / "Containerfile"
LOCAL_BASE = "localhost/classic-cnns-base:bookworm"
FLAVOURS = {"cpu": "bentofile.yaml", "gpu": "bentofile.gpu.yaml"}
# The base's packages: Python and its venv module (the build stage makes the venv with it). Docs,
# manuals and translations are left out; merged /usr without the usrmerge package, which pulls in
# Perl (47 MB) for a one-time conversion.
MMDEBSTRAP = [
    "mmdebstrap",
    "--quiet",
    "--variant=minbase",
    "--include=python3,python3-venv",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "locale", "info")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
    "bookworm",
]


class BuildError(Exception):
    """A step that cannot go on, in one line for the user."""


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def output(*cmd: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise BuildError(f"{' '.join(cmd[:3])} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def engine() -> str:
    """ENGINE when set; else podman when installed, else docker when its daemon answers."""
    chosen = os.environ.get("ENGINE")
    if chosen:
        if not shutil.which(chosen):
            raise BuildError(f"ENGINE={chosen} is not on PATH; use podman or docker")
        return chosen
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    raise BuildError("no container engine: install podman (apt-get install podman runc) or start docker")


def image_exists(engine: str, name: str) -> bool:
    return subprocess.run([engine, "image", "inspect", name], capture_output=True).returncode == 0


def local_base(engine: str) -> str:
    """The Debian base, made once from Debian packages and imported into the engine."""
    if image_exists(engine, LOCAL_BASE):
        return LOCAL_BASE
    if not shutil.which("mmdebstrap"):
        raise BuildError(
            "no base image: install mmdebstrap (apt-get install mmdebstrap) to make one from Debian "
            "packages, or name one with BASE_IMAGE=python:3.11-slim where a registry is reachable"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "base.tar"
        run(*MMDEBSTRAP, str(tar))
        run(engine, "import", "--quiet", str(tar), LOCAL_BASE, stdout=subprocess.DEVNULL)
    return LOCAL_BASE


def base_python(engine: str, base: str) -> tuple[str, int, str]:
    """The base image's Python version ("3.11"), glibc minor version (36 for 2.36) and machine
    ("x86_64"): which wheels it can install."""
    probe = (
        "import platform, sys; "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.libc_ver()[1], platform.machine())"
    )
    version, libc, machine = output(engine, "run", "--rm", "--entrypoint", "python3", base, "-c", probe).split()
    return version, int(libc.split(".")[1]), machine


def download_wheels(requirements: Path, into: Path, python: str, glibc_minor: int, machine: str) -> None:
    """Every wheel ``requirements`` needs, for that Python, glibc and machine. pip matches platform
    tags exactly, so each manylinux tag the base can run is named: 2_17 (the oldest that wheels use
    today; manylinux2014 stands for it and brings the older aliases) up to the base's own."""
    tags = [f"manylinux_2_{v}" for v in range(glibc_minor, 16, -1)] + ["manylinux2014"]
    platforms = [f"{tag}_{machine}" for tag in tags]
    shutil.rmtree(into, ignore_errors=True)  # only what these requirements need: pip's cache makes it quick
    run(
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
        *(f"--platform={p}" for p in platforms), "--dest", str(into), "-r", str(requirements),
    )  # fmt: skip


def build_bento(bentofile: str, context: Path) -> str:
    """`bentoml build` and `bentoml export`, unpacked into ``context``/bento; returns the bento's tag."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    tag = output(sys.executable, "-m", "bentoml", "build", "-f", bentofile, str(REPO), "--output", "tag", env=env)
    tag = tag.strip().splitlines()[-1].removeprefix("__tag__:")
    archive = context / "classifier.bento"
    output(sys.executable, "-m", "bentoml", "export", tag, str(archive), env=env)
    shutil.rmtree(context / "bento", ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(context / "bento", filter="data")
    archive.unlink()
    return tag


def containerfile(bento: Path, models: str | None) -> str:
    """deploy/Containerfile with the bento's envs (bentofile `envs:`) as ENV lines, and SERVING_MODELS
    when the bento was built with other models than the shipped ones: the image serves what it holds."""
    envs = yaml.safe_load((bento / "bento.yaml").read_text()).get("envs") or []
    lines = [f"ENV {e['name']}={e['value']!s}" for e in envs if e.get("stage", "all") != "build" and "value" in e]
    if models:
        lines.append(f"ENV SERVING_MODELS={models}")
    return CONTAINERFILE.read_text().replace("@BENTO_ENVS@", "\n".join(lines))


def build(flavour: str, tag: str, base_image: str | None) -> None:
    tool = engine()
    base = base_image or local_base(tool)
    context = REPO / "build" / "image" / flavour
    context.mkdir(parents=True, exist_ok=True)
    bento_tag = build_bento(FLAVOURS[flavour], context)
    python, glibc_minor, machine = base_python(tool, base)
    download_wheels(context / "bento/env/python/requirements.txt", context / "wheels", python, glibc_minor, machine)
    shutil.copy(REPO / "deploy" / "check_image.py", context / "check_image.py")
    (context / "Containerfile").write_text(containerfile(context / "bento", os.environ.get("SERVING_MODELS")))
    # podman writes OCI images by default, which have no HEALTHCHECK; the docker format keeps it.
    fmt = ["--format", "docker"] if tool == "podman" else []
    run(tool, "build", *fmt, "--build-arg", f"BASE_IMAGE={base}", "--label", f"bento={bento_tag}",
        "-t", tag, "-f", str(context / "Containerfile"), str(context))  # fmt: skip
    size = output(tool, "image", "inspect", "--format", "{{.Size}}", tag).strip()
    print(f"built {tag} ({int(size) / 1e6:.0f} MB) from bento {bento_tag} on {base} with {tool}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the service's container image from its bento.")
    parser.add_argument("--gpu", action="store_true", help="the CUDA image (bentofile.gpu.yaml)")
    parser.add_argument("--tag", help="image name (default: classic-cnns:cpu, or classic-cnns:gpu)")
    parser.add_argument(
        "--base-image",
        default=os.environ.get("BASE_IMAGE") or None,
        help="a base with Python 3 and venv (default: $BASE_IMAGE, else one made from Debian packages)",
    )
    args = parser.parse_args()
    flavour = "gpu" if args.gpu else "cpu"
    try:
        build(flavour, args.tag or f"classic-cnns:{flavour}", args.base_image)
    except BuildError as err:
        sys.exit(f"deploy.image: {err}")
    except subprocess.CalledProcessError as err:
        sys.exit(f"deploy.image: {' '.join(map(str, err.cmd[:3]))} failed with exit status {err.returncode}")


if __name__ == "__main__":
    main()

"""Starting a server and waiting for it, for the benchmarks and the tests: a free loopback port, a
process group of its own, a readiness check, and a stop that ends the whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
READY_SECONDS = 300  # importing torch and building ResNet-18 on a loaded 2-core machine is slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """``command`` from ``cwd`` (the repository root) with ``env`` added, in a process group of its own (so
    that :func:`stop` ends its children too), its output into ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def answers(url: str) -> bool:
    """Whether GET ``url`` answers 200 now."""
    import httpx  # here: benchmarks/gpu/serving.py imports this module on machines without it

    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def process(
    name: str, command: list[str], env: dict[str, str], ready_url: str, logdir: Path, cwd: Path = REPO
) -> Iterator[int]:
    """Start ``command`` (:func:`start`); yield its pid once ``ready_url`` answers 200; stop it whatever happens."""
    log = logdir / f"{name}.log"
    child = start(command, env, log, cwd)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not answers(ready_url):
            if child.poll() is not None:
                raise SystemExit(f"error: {name} exited with {child.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: {name} not ready after {READY_SECONDS} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield child.pid
    finally:
        stop(child)


def stop(child: subprocess.Popen, wait_s: float = 30) -> None:
    """End ``child``'s process group: SIGTERM, then SIGKILL if it has not exited within ``wait_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

"""Starting a server for a benchmark and waiting for it: a free loopback port, and a process
group that is killed whatever happens."""

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


@contextlib.contextmanager
def process(name: str, command: list[str], env: dict[str, str], ready_url: str, logdir: Path) -> Iterator[int]:
    """Start ``command`` in its own process group; yield its pid once ``ready_url`` answers 200; kill the group."""
    import httpx  # here: benchmarks/gpu_serving.py imports this module for stop() on machines without it

    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if child.poll() is not None:
                raise SystemExit(f"error: {name} exited with {child.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
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

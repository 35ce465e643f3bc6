"""Starting a server and waiting for it, for the benchmarks and the tests: a free loopback port, a
process group of its own, a readiness check, and a stop that ends the whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
# Straight to the server: these are loopback URLs, which a proxy set in the environment must not see.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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


def fetch(url: str, timeout: float = 30) -> str:
    """The body of a 2xx answer to GET ``url``; an OSError (urllib's HTTPError, URLError) for
    anything else. The standard library's client: the GPU machines have no httpx."""
    with _DIRECT.open(url, timeout=timeout) as answer:
        return answer.read().decode()


def answers(url: str, timeout: float = 10) -> bool:
    """Whether GET ``url`` answers 2xx now."""
    try:
        fetch(url, timeout)
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False
    return True


def metric_sums(base: str, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram on a service's /metrics, over all its label sets and workers."""
    count = total = 0.0
    for line in fetch(base + "/metrics").splitlines():
        if line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


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

"""The load generators and what they measure: request bodies written once, wrk (a C client) or a
Python closed loop (``benchmarks.closed_loop``, for machines without wrk) sending them, and the
server's CPU per request read from /proc.

Both clients run closed loops (each connection sends its next request when its last is answered)
and return the same dict: requests answered 2xx, errors (other statuses, socket errors,
timeouts), requests/s, p50/p99/max latency in ms, server CPU ms per request and cores, and the
client's own cores. Server CPU is read for the server's whole process tree (every thread of every
process), before and after the run, so it counts the framework's work as well as ours. Python
load clients were not the default: on a 2-core machine one took half a core from the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from benchmarks.servers import REPO

LUA = Path(__file__).with_name("multipart.lua")
TICKS = os.sysconf("SC_CLK_TCK")
CLIENT_TIMEOUT_S = 30.0  # a request not answered in this long is an error, for both clients (wrk: --timeout)


@dataclass(frozen=True)
class Bodies:
    """Request bodies written for wrk: ``count`` files in ``folder``, all of ``content_type``."""

    folder: Path
    count: int
    content_type: str
    headers: tuple[str, ...] = ()  # more "Name: value" headers, the same on every request


def write_bodies(folder: Path, images: list[bytes], image_type: str, fields: dict[str, str] | None = None) -> Bodies:
    """One multipart body per image (field ``image``, plus text ``fields``), as curl -F would send it."""
    folder.mkdir(parents=True, exist_ok=True)
    boundary = uuid.uuid4().hex
    extension = image_type.split("/")[-1]
    for i, image in enumerate(images):
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in (fields or {}).items()
        ]
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.{extension}"\r\n'
            f"Content-Type: {image_type}\r\n\r\n"
        )
        parts.append(head.encode() + image + f"\r\n--{boundary}--\r\n".encode())
        (folder / str(i)).write_bytes(b"".join(parts))
    return Bodies(folder, len(images), f"multipart/form-data; boundary={boundary}")


def write_raw_bodies(folder: Path, bodies: list[bytes], content_type: str, headers: tuple[str, ...] = ()) -> Bodies:
    """Bodies already encoded (a v2 infer request, say), sent as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(bodies):
        (folder / str(i)).write_bytes(body)
    return Bodies(folder, len(bodies), content_type, headers)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far, all their threads included."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / TICKS


@dataclass
class Cost:
    """What a run cost: its wall seconds, the server tree's CPU seconds, the client processes' CPU seconds."""

    seconds: float = 0.0
    server_cpu: float | None = None  # None: no server pid given
    client_cpu: float = 0.0


@contextlib.contextmanager
def measured(server_pid: int | None) -> Iterator[Cost]:
    """Measure the block: wall time, the CPU of ``server_pid``'s process tree (as it is when the block
    starts) and of the child processes the block waited for (the load client)."""
    pids = process_tree(server_pid) if server_pid else []
    client_before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(pids)
    started, cost = time.perf_counter(), Cost()
    yield cost
    cost.seconds = time.perf_counter() - started
    cost.server_cpu = cpu_seconds(pids) - server_before if pids else None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost.client_cpu = (after.ru_utime + after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)


def figures(concurrency: int, done: int, errors: int, duration: float, latencies: tuple, cost: Cost) -> dict:
    """A run's row: requests answered 2xx and the rest, requests/s over the client's ``duration``,
    (p50, p99, max) ms, and what the server and the client spent."""
    p50, p99, worst = latencies
    server = cost.server_cpu
    return {
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "rps": done / duration,
        "p50": p50,
        "p99": p99,
        "max": worst,
        "server_cpu_ms": server * 1000 / done if (server is not None and done) else float("nan"),
        "server_cores": server / cost.seconds if server is not None else float("nan"),
        "client_cores": cost.client_cpu / cost.seconds,
    }


def run_wrk(url: str, bodies: Bodies, concurrency: int, seconds: float, server_pid: int | None = None) -> dict:
    """One closed-loop wrk run; figures in requests/s, milliseconds and server CPU ms per request.

    Only 2xx answers count as done: a non-2xx answer, a socket error or a timeout is an error.
    """
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed; run 'apt-get install wrk'")
    threads = min(concurrency, 2)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        f"{CLIENT_TIMEOUT_S:g}s",
        "-s",
        str(LUA),
        url,
        "--",
        str(bodies.folder),
        str(bodies.count),
        bodies.content_type,
        *bodies.headers,
    ]
    with measured(server_pid) as cost:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    raw = json.loads(lines[-1])
    done = raw["requests"] - raw["non_2xx"]
    errors = raw["non_2xx"] + raw["socket_errors"] + raw["timeouts"]
    latencies = (raw["p50_us"] / 1000, raw["p99_us"] / 1000, raw["max_us"] / 1000)
    return figures(concurrency, done, errors, raw["duration_us"] / 1e6, latencies, cost)


def run_closed_loop(
    url: str, bodies: Bodies, concurrency: int, seconds: float, server_pid: int | None = None, processes: int = 0
) -> dict:
    """:func:`run_wrk`'s figures from ``processes`` client processes (0: a quarter of the cores,
    at most one per connection), the connections shared among them; ``client`` says which client ran."""
    processes = min(concurrency, processes or max(1, (os.cpu_count() or 1) // 4))
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    command = [
        sys.executable,
        "-m",
        "benchmarks.closed_loop",
        "--url",
        url,
        "--bodies",
        str(bodies.folder),
        "--count",
        str(bodies.count),
    ]
    command += ["--content-type", bodies.content_type, "--seconds", f"{seconds:g}"]
    command += [a for h in bodies.headers for a in ("--header", h)]
    with measured(server_pid) as cost:
        children = [
            subprocess.Popen(
                [*command, "--concurrency", str(share), "--offset", str(k * 7919)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            for k, share in enumerate(shares)
        ]
        outputs = [child.communicate(timeout=seconds + CLIENT_TIMEOUT_S + 30)[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"a load client failed: exit statuses {[child.returncode for child in children]}")
    runs = [json.loads(output) for output in outputs]
    done, errors = sum(r["ok"] for r in runs), sum(r["errors"] for r in runs)
    ms = sorted(x for r in runs for x in r["latencies"]) or [float("nan")]
    latencies = (ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))], ms[-1])
    client = f"python closed loop (benchmarks.closed_loop), {processes} process(es)"
    return {**figures(concurrency, done, errors, max(r["seconds"] for r in runs), latencies, cost), "client": client}

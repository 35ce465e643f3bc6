"""Soak: the real service under mixed traffic for half an hour or more, its memory sampled throughout.

    python -m benchmarks.soak --minutes 35 --write BENCHMARKS.md     # the run; its plot: docs/soak.png
    python -m benchmarks.soak --minutes 20 --leak                    # a planted leak: the check must fail

One ``bentoml serve`` of the shipped models, with a token and model control on, gets for the whole run:

- from wrk (a C client, so that the load does not take the server's cores), in rounds of a minute:
  PNGs, JPEG photos from a phone (2 MB), batches of 16, v2 infer with binary and JSON tensors,
  /explain, GET /models, and bad input: not an image, a truncated PNG, each crafted file of the
  hostile set (tests/hostile.py), a pixel bomb, an unknown model, a bad top_k, a missing token;
- from threads of this process: slow clients (one sends its body at 1 KB/s and must be cut, 408;
  one at 64 KB/s and must be answered), a model loaded, asked and unloaded every minute, and
  /monitor and /metrics scraped every 5 s.

Every few seconds the resident (RSS) and proportional (PSS) memory of each process of the service
is read from /proc. The check, after ``--warmup-minutes``: no process grows by more than
``--max-growth-mb`` (the median of its last ``--window-minutes`` against its first), no answer is a
5xx and no request fails at the socket, and the request rate of the last window is within
``--max-rate-change`` of the first. ``--leak`` serves ``benchmarks.soak_leak`` instead, the same
service keeping one request body in ten for good: the same check must fail, or it proves nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.images import fashion_images, fashion_photos, fashion_pngs
from benchmarks.load import CLIENT_TIMEOUT_S, process_tree
from benchmarks.report import device, write_section
from benchmarks.servers import REPO, free_port, process
from model_store.files import atomic_output

LUA = Path(__file__).with_name("soak.lua")
SECTION = "## Soak: memory, errors and rate over half an hour of mixed traffic"
TOKEN = "soak-token"
SPARE = "soak-spare"  # a second name of the shipped LeNet, loaded and unloaded through the run
ROLES = (("bentoml serve", "server"), ("_bentoml_impl.worker.service", "worker"), ("serving.decoders", "decoder"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=35, help="length of the run (default: 35)")
    parser.add_argument("--warmup-minutes", type=float, default=5, help="left out of the check (default: 5)")
    parser.add_argument("--window-minutes", type=float, default=5, help="first and last stretch compared (default: 5)")
    parser.add_argument("--max-growth-mb", type=float, default=30, help="per process, RSS and PSS (default: 30)")
    parser.add_argument("--max-rate-change", type=float, default=0.10, help="last window vs first (default: 0.10)")
    parser.add_argument("--connections", type=int, default=8, help="wrk's connections (default: 8)")
    parser.add_argument("--sample-s", type=float, default=5, help="memory sampling interval (default: 5)")
    parser.add_argument("--leak", action="store_true", help="serve the service with a planted leak")
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "soak", help="samples and logs (default: build/soak)"
    )
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "soak.png", help="default: docs/soak.png")
    parser.add_argument("--write", type=Path, default=None, help="write the figures into this BENCHMARKS.md")
    return parser


# --- the requests wrk sends ---------------------------------------------------------------------


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "soak7f3a9c"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for field, filename, data, kind in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def v2_binary(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request as tritonclient sends it: a JSON header, then the pixels as raw bytes."""
    header = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [len(images), 1, 28, 28],
                "parameters": {"binary_data_size": images.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    kind = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + images.tobytes(), kind


def requests_mix() -> list[tuple[str, int, int, str, str, dict[str, str], bytes]]:
    """(name, weight, expected status, method, path, headers, body) of every request wrk sends."""
    from tests.hostile import crafted, tall_png

    auth = {"Authorization": f"Bearer {TOKEN}"}
    pngs, images = fashion_pngs(64), fashion_images(64)
    photo = fashion_photos(1, (1600, 1200))[0]  # a 2-megapixel phone photo, about 0.3 MB
    mix = []

    def form(name, weight, path, fields, files, expect=200, headers=auth):
        body, kind = multipart(fields, files)
        mix.append((name, weight, expect, "POST", path, {**headers, "Content-Type": kind}, body))

    for i in range(8):  # a few distinct images, so that nothing is answered from a cache of one
        form(f"png-{i}", 5, "/classify", {}, [("image", f"{i}.png", pngs[i], "image/png")])
    form("photo", 4, "/classify", {"top_k": "5"}, [("image", "phone.jpg", photo, "image/jpeg")])
    form(
        "batch-16", 6, "/classify_batch", {}, [("images", f"{i}.png", p, "image/png") for i, p in enumerate(pngs[:16])]
    )
    body, kind = v2_binary(images[:4, None])
    mix.append(("v2-binary", 8, 200, "POST", "/v2/models/fashion-lenet/infer", {**auth, **kind}, body))
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"}}
    v2_json = {"inputs": [{**tensor, "data": [base64.b64encode(pngs[9]).decode()]}]}
    json_kind = {"Content-Type": "application/json"}
    mix.append(
        (
            "v2-json",
            6,
            200,
            "POST",
            "/v2/models/fashion-lenet/infer",
            {**auth, **json_kind},
            json.dumps(v2_json).encode(),
        )
    )
    form("explain", 3, "/explain", {"model": "fashion-resnet20"}, [("image", "x.png", pngs[10], "image/png")])
    mix.append(("models", 2, 200, "GET", "/models", auth, b""))
    # bad input, each answered 4xx
    junk = b"these are not the bytes of an image"
    form("not-an-image", 2, "/classify", {}, [("image", "x.png", junk, "image/png")], 400)
    form("truncated-png", 2, "/classify", {}, [("image", "x.png", pngs[11][:200], "image/png")], 400)
    for name, data in crafted().items():
        form(f"hostile-{name}", 1, "/classify", {}, [("image", "x.bin", data, "application/octet-stream")], 400)
    form("pixel-bomb", 2, "/classify", {}, [("image", "bomb.png", tall_png(50_000_000), "image/png")], 400)
    form("unknown-model", 1, "/classify", {"model": "no-such-model"}, [("image", "x.png", pngs[12], "image/png")], 404)
    form("bad-top-k", 1, "/classify", {"top_k": "0"}, [("image", "x.png", pngs[13], "image/png")], 400)
    form("no-token", 1, "/classify", {}, [("image", "x.png", pngs[14], "image/png")], 401, headers={})
    return mix


def write_requests(folder: Path) -> dict[str, tuple[int, int]]:
    """The mix as soak.lua reads it; returns each request's weight and expected status by name."""
    folder.mkdir(parents=True, exist_ok=True)
    schedule, weights = [], {}
    for n, (name, weight, expect, method, path, headers, body) in enumerate(requests_mix()):
        head = "\n".join([f"{method} {path}", *(f"{k}: {v}" for k, v in headers.items())])
        (folder / f"{n}.head").write_text(head)
        (folder / f"{n}.body").write_bytes(body)
        schedule += [n] * weight
        weights[name] = (weight, expect)
    # spread each request's turns over the schedule rather than sending them back to back
    order = np.random.default_rng(0).permutation(len(schedule))
    (folder / "schedule").write_text("\n".join(str(schedule[i]) for i in order) + "\n")
    return weights


def wrk_round(url: str, folder: Path, connections: int, seconds: float) -> dict:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", f"{CLIENT_TIMEOUT_S:g}s"]
    result = subprocess.run([*command, "-s", str(LUA), url, "--", str(folder)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return json.loads(lines[-1])


# --- what runs beside wrk ------------------------------------------------------------------------


class Chores:
    """The traffic wrk cannot make, each kind in its own thread, every answer's status recorded."""

    def __init__(self, url: str, stop: threading.Event):
        self.url, self.port, self.stop = url, int(url.rsplit(":", 1)[1]), stop
        self.statuses: list[tuple[float, str, int]] = []  # (time, kind, HTTP status or 0 for no answer)
        self.metrics_bytes: list[tuple[float, int]] = []
        self.png = fashion_pngs(1)[0]
        self.photo = fashion_photos(1, (1600, 1200))[0]

    def call(self, kind: str, method: str, path: str, body: bytes | None = None, headers=None) -> bytes:
        request = urllib.request.Request(self.url + path, body, {"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        request.method = method
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=CLIENT_TIMEOUT_S * 10) as answer:  # a load takes seconds
                status, data = answer.status, answer.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        except OSError:
            status, data = 0, b""
        self.statuses.append((time.monotonic(), kind, status))
        return data

    def every(self, seconds: float, work) -> threading.Thread:
        def loop():
            while not self.stop.wait(seconds):
                work()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def scrape(self) -> None:
        self.call("monitor", "GET", "/monitor")
        self.metrics_bytes.append((time.monotonic(), len(self.call("metrics", "GET", "/metrics"))))

    def model_cycle(self) -> None:
        self.call("load", "POST", f"/v2/repository/models/{SPARE}/load")
        body, kind = multipart({"model": SPARE}, [("image", "x.png", self.png, "image/png")])
        self.call("spare-classify", "POST", "/classify", body, {"Content-Type": kind})
        self.call("unload", "POST", f"/v2/repository/models/{SPARE}/unload")

    def slow_client(self, kind: str, bytes_per_s: int) -> None:
        """POST the photo at ``bytes_per_s`` on a socket of its own, and record the answer's status;
        once the server answers (a 408 for a body too slow), the rest of the body is not sent."""
        body, content_type = multipart({}, [("image", "phone.jpg", self.photo, "image/jpeg")])
        head = (
            f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        status, chunk = 0, max(1, bytes_per_s // 10)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT_S) as s:
                s.sendall(head.encode())
                for start in range(0, len(body), chunk):
                    if self.stop.is_set() or select.select([s], [], [], 0)[0]:  # stopping, or answered
                        break
                    s.sendall(body[start : start + chunk])
                    time.sleep(0.1)  # this client's slowness is the point
                line = s.makefile("rb").readline()
                status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
        except OSError:
            pass  # no answer: recorded as 0
        if not self.stop.is_set():
            self.statuses.append((time.monotonic(), kind, status))

    def start(self) -> list[threading.Thread]:
        return [
            self.every(5, self.scrape),
            self.every(60, self.model_cycle),
            self.every(1, lambda: self.slow_client("slow-408", 1024)),
            self.every(1, lambda: self.slow_client("slow-ok", 256 * 1024)),
        ]

    def expected(self, kind: str) -> int:
        return 408 if kind == "slow-408" else 200


# --- memory ---------------------------------------------------------------------------------------


def role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read().replace(b"\0", b" ").decode(errors="replace")
    return next((name for needle, name in ROLES if needle in command), "other")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; PSS shares each page among the processes that map it."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/smaps_rollup") as f:
        pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return rss, pss


def sample(server: int, started: float, every_s: float, stop: threading.Event, into: list) -> None:
    """Every ``every_s``: (seconds, pid, role, RSS KiB, PSS KiB) of each process of the service."""
    while not stop.is_set():
        now = time.monotonic() - started
        for pid in process_tree(server):
            try:
                into.append((now, pid, role(pid), *memory_kib(pid)))
            except (OSError, StopIteration):
                continue  # ended meanwhile (a decoder replaced, say)
        stop.wait(every_s)


# --- the run --------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def soak(args: argparse.Namespace, out: Path) -> dict:
    """Run the service under the mix for ``args.minutes``; everything measured, as one dict."""
    home = out / "bentoml"
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    cli("-m", "model_store", "register-default", env=env)
    cli("-m", "model_store", "register", "model_store/default/fashion-lenet.onnx", "--name", SPARE, env=env)
    weights = write_requests(out / "requests")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    target = "benchmarks.soak_leak:Classifier" if args.leak else "serving.service:Classifier"
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    settings = {**env, "SERVING_AUTH_TOKEN": TOKEN, "SERVING_MODEL_CONTROL": "true"}
    stop, samples, rounds = threading.Event(), [], []
    with process("service", command, settings, f"{url}/readyz", out) as server:
        started = time.monotonic()
        sampler = threading.Thread(target=sample, args=(server, started, args.sample_s, stop, samples), daemon=True)
        sampler.start()
        chores = Chores(url, stop)
        threads = chores.start()
        while (left := args.minutes * 60 - (time.monotonic() - started)) > 5:
            begun = time.monotonic() - started
            figures = wrk_round(url, out / "requests", args.connections, min(60.0, left))
            rounds.append({"start": begun, "end": time.monotonic() - started, **figures})
            print(
                f"{rounds[-1]['end'] / 60:5.1f} min: {figures['requests'] / (figures['duration_us'] / 1e6):6.0f} req/s "
                f"{figures['statuses']}",
                flush=True,
            )
        stop.set()
        for thread in [sampler, *threads]:
            thread.join(timeout=CLIENT_TIMEOUT_S * 10)
        seconds = time.monotonic() - started
    return {
        "leak": args.leak,
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        "minutes": args.minutes,
        "goal": {
            name: getattr(args, name)
            for name in ("warmup_minutes", "window_minutes", "max_growth_mb", "max_rate_change", "sample_s")
        },
        "seconds": seconds,
        "connections": args.connections,
        "device": device(),
        "date": time.strftime("%Y-%m-%d"),
        "weights": weights,
        "rounds": rounds,
        "chores": [(t - started, kind, status, chores.expected(kind)) for t, kind, status in chores.statuses],
        "metrics_bytes": [(t - started, size) for t, size in chores.metrics_bytes],
        "samples": samples,
    }


# --- the check ------------------------------------------------------------------------------------


def check(run: dict) -> tuple[list[str], dict]:
    """What failed the run's goal (empty: it held), and the figures it was judged on."""
    goal = run["goal"]
    warm, window, end = goal["warmup_minutes"] * 60, goal["window_minutes"] * 60, run["seconds"]
    failures, figures = [], {"processes": []}
    by_pid: dict[int, list] = {}
    for t, pid, name, rss, pss in run["samples"]:
        by_pid.setdefault(pid, []).append((t, name, rss, pss))
    for pid, rows in sorted(by_pid.items()):
        first = [r for r in rows if warm <= r[0] < warm + window]
        last = [r for r in rows if r[0] >= end - window]
        if not first or not last:
            continue  # started or ended mid-run (a decoder replaced): not a process of the whole run
        growth = [
            (statistics.median(r[i] for r in last) - statistics.median(r[i] for r in first)) / 1024 for i in (2, 3)
        ]
        row = {
            "pid": pid,
            "role": rows[0][1],
            "rss_mb": last[-1][2] / 1024,
            "rss_growth_mb": growth[0],
            "pss_growth_mb": growth[1],
        }
        figures["processes"].append(row)
        if max(growth) > goal["max_growth_mb"]:
            failures.append(f"{row['role']} {pid} grew {max(growth):.1f} MB (bound {goal['max_growth_mb']:g})")
    if not figures["processes"]:
        failures.append("no process of the service lived through the whole run")
    statuses: dict[str, int] = {}
    for r in run["rounds"]:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    figures["statuses"] = statuses
    figures["requests"] = total = sum(statuses.values())
    if server_errors := sum(count for status, count in statuses.items() if int(status) >= 500):
        failures.append(f"{server_errors} answers of 5xx to wrk's requests")
    if broken := sum(r["socket_errors"] + r["timeouts"] for r in run["rounds"]):
        failures.append(f"{broken} of wrk's requests failed at the socket or timed out")
    # the schedule cycles, so each status's share of the answers is its share of the mix
    weights = run["weights"].values()
    expected = {}
    for weight, status in weights:
        expected[str(status)] = expected.get(str(status), 0) + weight / sum(w for w, _ in weights)
    figures["expected_shares"] = expected
    for status in sorted(set(expected) | set(statuses)):
        share = statuses.get(status, 0) / max(total, 1)
        if abs(share - expected.get(status, 0)) > 0.01:
            failures.append(f"status {status}: {share:.1%} of answers, the mix expects {expected.get(status, 0):.1%}")
    wrong = [(kind, status) for _, kind, status, want in run["chores"] if status != want]
    figures["chores"] = len(run["chores"])
    if wrong:
        failures.append(f"{len(wrong)} of {len(run['chores'])} side requests got another answer, e.g. {wrong[:3]}")

    def rate(start: float, stop: float) -> float:
        inside = [r for r in run["rounds"] if start <= (r["start"] + r["end"]) / 2 < stop]
        return sum(r["requests"] for r in inside) / max(sum(r["duration_us"] for r in inside) / 1e6, 1e-9)

    figures["rate_first"], figures["rate_last"] = rate(warm, warm + window), rate(end - window, end)
    change = figures["rate_last"] / max(figures["rate_first"], 1e-9) - 1
    figures["rate_change"] = change
    if abs(change) > goal["max_rate_change"]:
        failures.append(f"request rate moved {change:+.1%} from the first window to the last")
    sizes = run["metrics_bytes"]
    figures["metrics_kb"] = (sizes[0][1] / 1024, sizes[-1][1] / 1024) if sizes else (0, 0)
    return failures, figures


# --- the record -------------------------------------------------------------------------------------


def plot(runs: dict[str, dict], path: Path) -> None:
    """Each run's memory per process over time (RSS, MB), with its request rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 4 * len(runs)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        by_pid: dict[int, list] = {}
        for t, pid, role_, rss, _ in run["samples"]:
            by_pid.setdefault(pid, []).append((t / 60, rss / 1024, role_))
        for pid, rows in sorted(by_pid.items(), key=lambda item: -max(r[1] for r in item[1])):
            if rows[-1][0] - rows[0][0] >= run["goal"]["window_minutes"]:  # processes of the whole run
                ax.plot([r[0] for r in rows], [r[1] for r in rows], label=f"{rows[0][2]} {pid}")
        ax.axvspan(0, run["goal"]["warmup_minutes"], color="0.9")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MB)")
        failures, _ = check(run)
        ax.set_title(f"{name}: {'goal held' if not failures else 'check failed: ' + failures[0]}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        rates = ax.twinx()
        rates.plot(
            [(r["start"] + r["end"]) / 120 for r in run["rounds"]],
            [r["requests"] / (r["duration_us"] / 1e6) for r in run["rounds"]],
            color="0.5",
            linestyle=":",
        )
        rates.set_ylabel("requests/s (dotted)")
        rates.set_ylim(bottom=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "wb") as f:
        figure.savefig(f, format="png", dpi=90)


def report(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))
    goal = first["goal"]
    lines = [
        f"Device: {first['device']}; {first['date']}. Commands: "
        + ", then ".join(f"`{run['command']}`" for run in runs.values())
        + ". One `bentoml serve` of the "
        f"shipped models (a token, model control on), wrk with {first['connections']} connections in rounds of a "
        f"minute over a mix of {len(first['weights'])} requests (benchmarks/soak.py's docstring), slow clients, a "
        "model loaded and unloaded every minute, /monitor and /metrics every 5 s. Memory of every process every "
        f"{goal['sample_s']:g} s; growth is the median of the last {goal['window_minutes']:g} minutes against the first "
        f"{goal['window_minutes']:g} after {goal['warmup_minutes']:g} of warm-up. Plot: `docs/soak.png`.",
        "",
        "| run | minutes | requests | 5xx | rate, first → last window | process | RSS at end | RSS growth | PSS growth | /metrics | goal |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|---|",
    ]
    for name, run in runs.items():
        failures, f = check(run)
        errors = sum(c for s, c in f["statuses"].items() if int(s) >= 500)
        verdict = "held" if not failures else "failed: " + "; ".join(failures)
        for i, p in enumerate(f["processes"]):
            head = (
                f"| {name} | {run['seconds'] / 60:.0f} | {f['requests']:,} | {errors} | "
                f"{f['rate_first']:.0f} → {f['rate_last']:.0f} req/s ({f['rate_change']:+.1%}) |"
                if i == 0
                else "| | | | | |"
            )
            tail = f" {f['metrics_kb'][0]:.0f} → {f['metrics_kb'][1]:.0f} KB | {verdict} |" if i == 0 else " | |"
            lines.append(
                f"{head} {p['role']} | {p['rss_mb']:.0f} MB | {p['rss_growth_mb']:+.1f} MB | {p['pss_growth_mb']:+.1f} MB |"
                + tail
            )
    statuses = check(first)[1]["statuses"]
    lines += ["", "Answers by status (first run): " + ", ".join(f"{s}: {c:,}" for s, c in sorted(statuses.items()))]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed; run 'apt-get install wrk'")
    name = "leak" if args.leak else "clean"
    out = args.out / name
    shutil.rmtree(out, ignore_errors=True)  # a run's store and requests start fresh
    out.mkdir(parents=True)
    run = soak(args, out)
    with atomic_output(args.out / f"{name}.json", "w") as f:
        json.dump(run, f)
    runs = {
        n: json.loads((args.out / f"{n}.json").read_text())
        for n in ("clean", "leak")
        if (args.out / f"{n}.json").is_file()
    }
    plot(runs, args.plot)
    failures, figures = check(run)
    print(json.dumps({k: v for k, v in figures.items()}, indent=1))
    text = report(runs)
    print(f"\n{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "soak", text, SECTION)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

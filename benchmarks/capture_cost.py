"""What capture costs the service, and what a failing store costs it: wrk against `bentoml serve`
with capture off and on, in turn, in one run.

    python -m benchmarks.capture_cost --write BENCHMARKS.md

Part 1, server CPU per request at concurrency 32, capture off against on (SERVING_CAPTURE, the
default 1% sample and 10 captures a second), for three loads:
- sure: Fashion-MNIST test PNGs the LeNet answers sure (only the 1% sample is kept);
- unsure: uniform-noise PNGs the LeNet answers unsure: every answer a capture, held to the rate cap;
- photos: 12 MP JPEGs (2-3 MB) of test images, to a service that keeps every answer
  (SERVING_CAPTURE_SAMPLE=1): each capture is a photo's bytes, at the rate cap.
Goals: at most 3% more server CPU when every answer is sure, at most 10% at the rate cap.

Part 2, the unsure load against stores that fail: read-only (a path below a regular file: every
write fails), full (a 1 MB tmpfs, mounted here when the benchmark runs as root), and an S3 server
(moto's, on loopback) that stops answering, then comes back. Goals: requests/s within 10% of
capture off, no failed request, the drops counted, and capture resumed once the store is back.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks import turns
from benchmarks.images import encode, fashion_images, fashion_photos
from benchmarks.load import run_wrk, write_bodies
from benchmarks.report import device, write_section
from benchmarks.servers import free_port, process, start, stop
from model_store import to_input
from model_store.engine import OnnxClassifier, unsure
from model_store.store import DEFAULT_MODEL_FILE

SECTION, HEADING = "capture-cost", "## Capture: what it costs the service, and what a failing store costs"
CONCURRENCY = 32
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of part 1; the median is shown (default: 5)")
    parser.add_argument("--images", type=int, default=256, help="distinct images per load (default: 256)")
    parser.add_argument("--photos", type=int, default=16, help="distinct 12 MP photos (default: 16)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def sorted_pngs(count: int) -> tuple[list[bytes], list[bytes]]:
    """(PNGs of test images the LeNet answers sure, PNGs of noise it answers unsure), as served."""
    from PIL import Image

    def png_bytes(array: np.ndarray) -> bytes:
        return encode(Image.fromarray(array), "PNG")

    engine = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu")

    def is_unsure(array: np.ndarray) -> bool:
        pixels = to_input(Image.fromarray(array), engine.card)
        return unsure(engine.outcomes(pixels[None]).rows()[0], engine.card.calibration)["unsure"]

    sure = [png_bytes(a) for a in fashion_images(4 * count) if not is_unsure(a)][:count]
    noise = np.random.default_rng(0).integers(0, 256, (4 * count, 28, 28), dtype=np.uint8)
    unsure_ = [png_bytes(a) for a in noise if is_unsure(a)][:count]
    return sure, unsure_


def counter(base: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def with_env(server: turns.Server, **env: str) -> turns.Server:
    return server._replace(env={**server.env, **env})


def part_one(workdir: Path, args, loads: dict) -> dict:
    capture = {"SERVING_CAPTURE": str(workdir / "captures")}
    servers = {
        "capture": with_env(turns.service(workdir / "home-capture", {}), **capture),
        "capture-all": with_env(
            turns.service(workdir / "home-all", {}), SERVING_CAPTURE=str(workdir / "all"), SERVING_CAPTURE_SAMPLE="1"
        ),
    }
    ways = {  # "again": the same server and load a second time, so the table shows the noise between runs
        "sure, capture off": ("/classify", loads["sure"]),
        "sure, capture off, again": ("/classify", loads["sure"]),
        "sure, capture on": ("/classify", loads["sure"], "capture"),
        "unsure, capture off": ("/classify", loads["unsure"]),
        "unsure, capture off, again": ("/classify", loads["unsure"]),
        "unsure, capture on": ("/classify", loads["unsure"], "capture"),
        "photos, capture off": ("/classify", loads["photos"]),
        "photos, capture on (every answer)": ("/classify", loads["photos"], "capture-all"),
    }
    args.concurrency = [CONCURRENCY]
    return turns.load_in_turn(workdir, ways, args, more_servers=servers)


@contextlib.contextmanager
def moto(port: int, workdir: Path):
    child = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {}, workdir / "moto.log")
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}", timeout=1)
                break
            time.sleep(0.1)
        yield
    finally:
        stop(child)


def failing_store(name: str, env: dict, workdir: Path, bodies, args, phases=None) -> dict:
    """The unsure load against a service whose store fails; ``phases``: (label, action) pairs, the
    action run before each phase's wrk run (S3: stop, then restart, the server)."""
    home = workdir / f"home-{name}"
    server = with_env(turns.service(home, {}), **env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    runs = []
    with process(name, [*server.command, "--port", str(port)], server.env, base + server.ready, workdir) as pid:
        run_wrk(base + "/classify", bodies, 4, 1, pid)
        for label, action in phases or [("failing", None)]:
            if action:
                action()
            result = run_wrk(base + "/classify", bodies, CONCURRENCY, args.seconds, pid)
            result.update(
                phase=label,
                captured=counter(base, "classify_captured_total"),
                store_errors=counter(base, "classify_capture_dropped_total", reason="store_error"),
                queue_full=counter(base, "classify_capture_dropped_total", reason="queue_full"),
            )
            runs.append(result)
    return {"name": name, "runs": runs}


def part_two(workdir: Path, args, bodies) -> tuple[list[dict], list[str]]:
    results, not_measured = [], []
    blocker = workdir / "a-file"
    blocker.write_text("not a folder")
    results.append(failing_store("read-only", {"SERVING_CAPTURE": str(blocker / "captures")}, workdir, bodies, args))
    full = workdir / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode == 0:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:  # full to the last block
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        try:
            results.append(failing_store("full (1 MB tmpfs)", {"SERVING_CAPTURE": str(full)}, workdir, bodies, args))
        finally:
            subprocess.run(["umount", str(full)], check=False)
    else:
        not_measured.append(f"full store: a tmpfs could not be mounted here ({mounted.stderr.decode().strip()})")
    port = free_port()
    uri = f"s3://captures/bench?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    s3 = contextlib.ExitStack()

    def up() -> None:
        s3.enter_context(moto(port, workdir))
        httpx.put(f"http://127.0.0.1:{port}/captures", timeout=10)  # the bucket; moto keeps nothing across restarts

    def down() -> None:
        s3.close()

    up()
    try:
        phases = [("S3 up", None), ("S3 stopped", down), ("S3 back", up)]
        results.append(
            failing_store(
                "S3 (moto) that stops, then comes back",
                {"SERVING_CAPTURE": uri, **S3_ENV},
                workdir,
                bodies,
                args,
                phases,
            )
        )
    finally:
        s3.close()
    return results, not_measured


def report(runs: dict, failing: list[dict], not_measured: list[str], loads: dict, args) -> str:
    def median(way: str) -> dict:
        results = sorted(runs[(way, CONCURRENCY)], key=lambda r: r["server_cpu_ms"])
        return results[len(results) // 2]

    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.capture_cost "
        f"--seconds {args.seconds:g} --rounds {args.rounds} --images {args.images} --photos {args.photos}`. "
        f"wrk at concurrency {CONCURRENCY}, each way in turn in each round, the median round by server CPU shown; "
        "server CPU is the whole process tree's (decoders and the capture writer included). Photos: "
        f"{statistics.mean(map(len, loads['photo_bytes'])) / 2**20:.2f} MB on average.",
        "",
        "| load | capture | req/s | p99 ms | server CPU ms/req | CPU vs off | goal |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    goals = {"sure": 0.03, "unsure": 0.10, "photos": 0.10}
    for load, goal in goals.items():
        off = median(f"{load}, capture off")
        for way, _ in runs:
            if not way.startswith(f"{load}, "):
                continue
            r = median(way)
            shown = way.split(", ", 1)[1].removeprefix("capture ")
            extra = r["server_cpu_ms"] / off["server_cpu_ms"] - 1
            on = "capture on" in way
            verdict = (("met" if extra <= goal else "**missed**") + f" (at most +{goal:.0%})") if on else ""
            change = f"{extra:+.1%}" if r is not off else ""
            lines.append(
                f"| {load} | {shown} | {r['rps']:,.0f} | {r['p99']:.1f} | {r['server_cpu_ms']:.3f} | {change} | {verdict} |"
            )
    base = median("unsure, capture off")["rps"]
    lines += [
        "",
        f"The unsure load against failing stores, {args.seconds:g} s each (capture off: {base:,.0f} req/s in part 1):",
        "",
        "| store | phase | req/s | vs off | server CPU ms/req | failed requests | captured so far | dropped so far: store error, queue full | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for store in failing:
        for r in store["runs"]:
            ok = r["errors"] == 0 and r["rps"] >= 0.9 * base
            lines.append(
                f"| {store['name']} | {r['phase']} | {r['rps']:,.0f} | {r['rps'] / base:.2f}x | {r['server_cpu_ms']:.3f} | "
                f"{r['errors']} | {r['captured']:.0f} | {r['store_errors']:.0f}, {r['queue_full']:.0f} | "
                f"{'met' if ok else '**missed**'} |"
            )
    lines += [f"\nNot measured: {why}." for why in not_measured]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="capture-cost-") as folder:
        workdir = Path(folder)
        sure, unsure_pngs = sorted_pngs(args.images)
        photos = fashion_photos(args.photos)
        loads = {
            "sure": write_bodies(workdir / "sure", sure, "image/png"),
            "unsure": write_bodies(workdir / "unsure", unsure_pngs, "image/png"),
            "photos": write_bodies(workdir / "photos", photos, "image/jpeg"),
            "photo_bytes": photos,
        }
        runs = part_one(workdir, args, loads)
        failing, not_measured = part_two(workdir, args, loads["unsure"])
    text = report(runs, failing, not_measured, loads, args)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)
    return text


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

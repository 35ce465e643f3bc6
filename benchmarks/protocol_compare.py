"""What the Open Inference Protocol costs next to /classify: one `bentoml serve` of the shipped
LeNet, loaded by wrk in turn with each way of asking it the same question.

    python benchmarks/protocol_compare.py                          # c=1 and 32, 10 s, 3 rounds
    python benchmarks/protocol_compare.py --write BENCHMARKS.md

Ways (real Fashion-MNIST test images, one per request, encoded as tritonclient.http encodes them):

- classify: ``POST /classify``, the PNG as a multipart form (curl -F);
- v2-pixels: ``POST /v2/models/m/infer``, UINT8 [1, 1, 28, 28] as binary tensor data, FP32 answer
  in binary (tritonclient's defaults);
- v2-pixels-top3: the same, with ``class_count=3`` (the classification extension);
- v2-png: the PNG as a BYTES tensor in binary, decoded by the server;
- v2-json: pixels as a JSON list, answer in JSON (what curl and hand-written clients send).

Every way runs at each level in each round, in turn, so drift on a shared machine hits them alike;
the median round is reported. Server CPU per request is read from /proc for the server's process tree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.http as triton
from images import fashion_images, fashion_pngs
from report import device, write_section  # this script's folder is on sys.path
from servers import REPO, free_port, process
from wrk_load import Bodies, run_wrk, write_bodies, write_raw_bodies

SECTION = "## The v2 protocol (KServe / Triton) against /classify"
WAYS = ("classify", "v2-pixels", "v2-pixels-top3", "v2-png", "v2-json")


def infer_bodies(inputs_of, outputs=None, binary_output: bool = True) -> tuple[list[bytes], int | None]:
    """tritonclient's encoding of one request per input; JSON headers padded with spaces (valid
    JSON) to one length, since wrk sends one Inference-Header-Content-Length for all."""
    encoded = []
    for inputs in inputs_of:
        body, length = triton.InferenceServerClient.generate_request_body(
            inputs, outputs=outputs() if outputs else None
        )
        encoded.append((body, length))
    if encoded[0][1] is None:
        return [body for body, _ in encoded], None
    width = max(length for _, length in encoded)
    return [body[:length] + b" " * (width - length) + body[length:] for body, length in encoded], width


def pixels_input(image: np.ndarray, binary: bool) -> list:
    tensor = triton.InferInput("pixels", [1, 1, *image.shape], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(image[None, None]), binary_data=binary)
    return [tensor]


def png_input(png: bytes) -> list:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png], dtype=np.object_))
    return [tensor]


def write_ways(workdir: Path, count: int) -> dict:
    images, pngs = fashion_images(count), fashion_pngs(count)
    octet, ways = "application/octet-stream", {}
    ways["classify"] = write_bodies(workdir / "classify", pngs, "image/png")
    binary_out = lambda: [triton.InferRequestedOutput("probabilities", binary_data=True)]  # noqa: E731
    top3 = lambda: [triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3)]  # noqa: E731
    json_out = lambda: [triton.InferRequestedOutput("probabilities", binary_data=False)]  # noqa: E731
    for way, inputs, outputs in (
        ("v2-pixels", [pixels_input(a, True) for a in images], binary_out),
        ("v2-pixels-top3", [pixels_input(a, True) for a in images], top3),
        ("v2-png", [png_input(p) for p in pngs], binary_out),
        ("v2-json", [pixels_input(a, False) for a in images], json_out),
    ):
        bodies, length = infer_bodies(inputs, outputs)
        headers = (f"Inference-Header-Content-Length: {length}",) if length else ()
        ways[way] = write_raw_bodies(workdir / way, bodies, octet if length else "application/json", headers)
    return ways


def get_args_parser(description: str = __doc__.splitlines()[0], levels: tuple[int, ...] = (1, 32)):
    parser = argparse.ArgumentParser(description=description)
    shown = " ".join(map(str, levels))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(levels), help=f"levels (default: {shown})")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default: 3)")
    parser.add_argument("--images", type=int, default=256, help="distinct test images (default: 256)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="protocol-compare-") as folder:
        workdir = Path(folder)
        bodies = write_ways(workdir, args.images)
        urls = {way: "/classify" if way == "classify" else "/v2/models/fashion-lenet/infer" for way in WAYS}
        runs = load_in_turn(workdir, {way: (urls[way], bodies[way]) for way in WAYS}, args)
    text = report(runs, args)
    print(f"{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "protocol-compare", text, SECTION)


def load_in_turn(workdir: Path, ways: dict[str, tuple[str, Bodies]], args: argparse.Namespace) -> dict:
    """One `bentoml serve` of the shipped models, loaded by wrk with each way (its path, its bodies)
    in turn, at each of ``args.concurrency`` in each of ``args.rounds`` rounds:
    {(way, concurrency): [wrk result per round]}. A failed request stops it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    home = workdir / "bentoml"
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SERVING_LOG_REQUESTS": "false"}
    register = [sys.executable, "-m", "model_store", "register-default"]
    subprocess.run(register, cwd=REPO, env={**os.environ, **env}, check=True, capture_output=True)
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    runs: dict[tuple[str, int], list[dict]] = {}
    with process("service", command, env, base + "/readyz", workdir) as pid:
        for path, bodies in ways.values():  # warm: each way's first requests
            run_wrk(base + path, bodies, 4, 1, pid)
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for way, (path, bodies) in ways.items():
                    result = run_wrk(base + path, bodies, concurrency, args.seconds, pid)
                    if result["errors"]:
                        raise SystemExit(f"error: {way} at c={concurrency}: {result['errors']} failed requests")
                    runs.setdefault((way, concurrency), []).append(result)
                    print(json.dumps({"way": way, "round": round_, **result}), flush=True)
    return runs


def report(runs: dict, args: argparse.Namespace) -> str:
    about = (
        "One `bentoml serve` of the shipped models (SERVING_LOG_REQUESTS=false), the default LeNet asked, one "
        "image per request, wrk in a closed loop; each way in turn at each level in each round, the median round "
        "by requests/s shown. Ratios are to /classify in the same round set."
    )
    return ways_table(runs, args, "protocol_compare.py", about, WAYS, "classify", "/classify")


def ways_table(runs: dict, args, script: str, about: str, ways, baseline: str, baseline_label: str) -> str:
    """The section: device, date and command, ``about``, and per level and way the median round by
    requests/s, with its requests/s over ``baseline``'s median."""
    lines = [
        f"Device: {device()}. Date: {datetime.date.today()}. Command: `python benchmarks/{script} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --seconds {args.seconds:g} --rounds {args.rounds}`.",
        about,
        "",
        f"| way | concurrency | req/s | vs {baseline_label} | p50 ms | p99 ms | server CPU ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency in args.concurrency:
        base = statistics.median(r["rps"] for r in runs[(baseline, concurrency)])
        for way in ways:
            results = sorted(runs[(way, concurrency)], key=lambda r: r["rps"])
            r = results[len(results) // 2]
            lines.append(
                f"| {way} | {concurrency} | {r['rps']:,.0f} | {r['rps'] / base:.2f}x | {r['p50']:.2f} | "
                f"{r['p99']:.2f} | {r['server_cpu_ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

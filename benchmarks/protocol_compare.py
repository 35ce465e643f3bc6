"""What the Open Inference Protocol costs next to /classify: one `bentoml serve` of the shipped
LeNet, loaded by wrk in turn with each way of asking it the same question.

    python -m benchmarks.protocol_compare                          # c=1 and 32, 10 s, 3 rounds
    python -m benchmarks.protocol_compare --write BENCHMARKS.md

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
import sys
import tempfile
from pathlib import Path

from benchmarks.report import write_section
from benchmarks.turns import get_args_parser, load_in_turn, ways_table
from benchmarks.v2_bodies import write_ways

SECTION = "## The v2 protocol (KServe / Triton) against /classify"
WAYS = ("classify", "v2-pixels", "v2-pixels-top3", "v2-png", "v2-json")


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


def report(runs: dict, args: argparse.Namespace) -> str:
    about = (
        "One `bentoml serve` of the shipped models (SERVING_LOG_REQUESTS=false), the default LeNet asked, one "
        "image per request, wrk in a closed loop; each way in turn at each level in each round, the median round "
        "by requests/s shown. Ratios are to /classify in the same round set."
    )
    return ways_table(runs, args, "protocol_compare", about, WAYS, "classify", "/classify")


if __name__ == "__main__":
    sys.exit(main(get_args_parser(__doc__.splitlines()[0]).parse_args()))

"""What an explanation costs: the shipped ResNet-20's /explain next to its /classify and next to the
default LeNet's /classify, on one `bentoml serve` of the shipped models as `make serve` starts it.

    python -m benchmarks.explain_speed                     # c=1 and 8, 10 s, 3 rounds
    python -m benchmarks.explain_speed --write BENCHMARKS.md

Ways (real Fashion-MNIST test images as PNG, one per request, multipart as curl -F sends them):

- lenet-classify: ``POST /classify``, the default model;
- resnet20-classify: ``POST /classify?model=fashion-resnet20``, through the same batcher;
- resnet20-explain: ``POST /explain``, which names no model and gets the ResNet-20 (the first served
  model with a map); JSON with the overlay as a base64 PNG;
- resnet20-explain-png: the same with ``Accept: image/png``, the overlay alone.

/explain does not go through the batcher: each request runs the graph at batch size 1 for its logits
and map, then draws the overlay, on threads of its own. The way it is loaded (c=8 at most by
default) is what a person or a dashboard asks of it, not a bulk load.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from benchmarks.images import fashion_pngs
from benchmarks.load import write_bodies
from benchmarks.report import write_section
from benchmarks.turns import get_args_parser, load_in_turn, ways_table

SECTION = "## /explain: what a class-activation map costs"
WAYS = {
    "lenet-classify": "/classify",
    "resnet20-classify": "/classify?model=fashion-resnet20",
    "resnet20-explain": "/explain",
    "resnet20-explain-png": "/explain",
}


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="explain-speed-") as folder:
        workdir = Path(folder)
        forms = write_bodies(workdir / "forms", fashion_pngs(args.images), "image/png")
        png = dataclasses.replace(forms, headers=("Accept: image/png",))
        bodies = {way: png if way.endswith("-png") else forms for way in WAYS}
        runs = load_in_turn(workdir, {way: (path, bodies[way]) for way, path in WAYS.items()}, args)
    text = report(runs, args)
    print(f"{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "explain-speed", text, SECTION)


def report(runs: dict, args: argparse.Namespace) -> str:
    about = (
        "One `bentoml serve` with no settings but SERVING_LOG_REQUESTS=false: the two shipped models, LeNet the "
        "default. wrk in a closed loop, one PNG per request; each way in turn at each level in each round, the "
        "median round by requests/s shown. Ratios are to the ResNet-20's /classify in the same round set."
    )
    return ways_table(runs, args, "explain_speed", about, WAYS, "resnet20-classify", "resnet20 /classify")


if __name__ == "__main__":
    sys.exit(main(get_args_parser(__doc__.splitlines()[0], levels=(1, 8)).parse_args()))

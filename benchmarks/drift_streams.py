"""Does each shipped model's drift window stay quiet on clothes and alert on a shift? Streams of
answers through ``model_store.drift.Window``, as the service's monitor keeps it.

    python -m benchmarks.drift_streams --write BENCHMARKS.md

- in-distribution: ``--images`` (100,000) Fashion-MNIST test images drawn at random with
  replacement; every ``--every`` images the window's figures are compared with the levels. Goal:
  no alert at all.
- shifted: ``--lead`` (2,000) test images, then images of one other kind: digits, photographs and
  noise (``benchmarks.ood_sets``), test images blurred, at low contrast or rotated, or test images
  of footwear only (clothes the model knows, in other shares). Goal: an alert within 1,000 images
  of the shift; the table says after how many, and by which statistics.

Each image is scored once (``OnnxClassifier.outcomes``, after ``to_input`` as the service
decodes); a stream replays those answers, so a 100,000-image stream costs its windows only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.ood_sets import digits, fashion_test, noise, photos
from benchmarks.report import device, write_section
from benchmarks.streams import CORRUPTIONS, FOOTWEAR, answers, replay
from model_store.drift import STATISTICS, Window
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE

SECTION, HEADING = "drift-streams", "## Drift: in-distribution streams against shifted ones"
GOAL_IMAGES = 1000  # a shift must raise an alert within this many images of it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = [DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE]
    parser.add_argument(
        "--onnx", type=Path, nargs="+", default=shipped, help="graphs with a drift reference (default: shipped)"
    )
    parser.add_argument("--images", type=int, default=100_000, help="in-distribution stream length (default: 100000)")
    parser.add_argument("--lead", type=int, default=2000, help="test images before a shift (default: 2000)")
    parser.add_argument("--every", type=int, default=50, help="images between two looks at the window (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="draws the streams, the crops and the noise (default: 0)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def shifted_sets(rng: np.random.Generator, test: list[Image.Image], labels: np.ndarray) -> dict[str, list[Image.Image]]:
    """Each kind of image a stream can shift to, by the name the table shows."""
    sets = {"digits (scikit-learn)": digits(), "photographs (scikit-image crops)": photos(rng)}
    sets["uniform noise"] = noise(rng, (28, 28))
    for name, corrupt in CORRUPTIONS.items():
        sets[name] = [corrupt(image) for image in test[:2000]]
    sets["clothes, footwear only (test images)"] = [test[i] for i in np.flatnonzero(np.isin(labels, FOOTWEAR))]
    return sets


def evaluate(path: Path, test: list[Image.Image], sets: dict[str, list[Image.Image]], args) -> dict:
    engine = OnnxClassifier(path, device="cpu")
    if engine.drift_reference is None:
        raise SystemExit(f"error: {path} has no drift reference; export it again or run python -m export.ood_head")
    rng = np.random.default_rng(args.seed)
    held_in = answers(engine, test)
    calm = replay(Window(engine.drift_reference), [(held_in, rng.integers(0, len(test), args.images))], args.every)
    alerted = [seen for seen, alerts, _ in calm if alerts]
    levels = engine.drift_reference.levels
    highest = {s: max(figures[s] for _, _, figures in calm if figures) for s in STATISTICS}
    shifts = {}
    for name, images in sets.items():
        shifted = answers(engine, images)
        lead = rng.integers(0, len(test), args.lead)
        after = rng.integers(0, len(images), 2 * engine.drift_reference.window)
        looks = replay(Window(engine.drift_reference), [(held_in, lead), (shifted, after)], args.every)
        early = [seen for seen, alerts, _ in looks if alerts and seen <= args.lead]
        first = next(((seen, alerts) for seen, alerts, _ in looks if alerts and seen > args.lead), None)
        shifts[name] = {
            "images": len(images),
            "false_before": len(early),
            "after": None if first is None else first[0] - args.lead,
            "alerts": [] if first is None else first[1],
        }
    return {
        "name": path.stem,
        "levels": levels,
        "highest": highest,
        "calm": alerted,
        "looks": len(calm),
        "shifts": shifts,
    }


def report(results: list[dict], args) -> str:
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.drift_streams "
        f"--images {args.images} --lead {args.lead} --every {args.every} --seed {args.seed}`. The window: the "
        f"model's last {GOAL_IMAGES:,} answers, looked at every {args.every} images.",
        "",
        "| model | stream | images | looks with an alert | goal |",
        "|---|---|---:|---:|---|",
    ]
    for r in results:
        goal = "met" if not r["calm"] else "**missed**"
        lines.append(
            f"| {r['name']} | Fashion-MNIST test images, drawn at random | {args.images:,} | {len(r['calm'])} of {r['looks']:,} | {goal} |"
        )
    lines += [
        "",
        f"| model | shifted to, after {args.lead:,} test images | first alert, images after the shift | statistics above their level then | goal (within {GOAL_IMAGES:,}) |",
        "|---|---|---:|---|---|",
    ]
    for r in results:
        for name, s in r["shifts"].items():
            after = "none in 2 windows" if s["after"] is None else f"{s['after']:,}"
            met = s["after"] is not None and s["after"] <= GOAL_IMAGES and not s["false_before"]
            lines.append(
                f"| {r['name']} | {name} | {after} | {', '.join(s['alerts']) or '-'} | {'met' if met else '**missed**'} |"
            )
    lines += ["", "| model | | " + " | ".join(STATISTICS) + " |", "|---|---|" + "---:|" * len(STATISTICS)]
    for r in results:
        lines.append(f"| {r['name']} | level | " + " | ".join(f"{r['levels'][s]:.4g}" for s in STATISTICS) + " |")
        lines.append(
            f"| {r['name']} | highest in the in-distribution stream | "
            + " | ".join(f"{r['highest'][s]:.4g}" for s in STATISTICS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    if min(args.images, args.lead, args.every) < 1:
        raise SystemExit("error: --images, --lead and --every must be at least 1")
    test, labels = fashion_test()
    sets = shifted_sets(np.random.default_rng(args.seed), test, labels)
    text = report([evaluate(path, test, sets, args) for path in args.onnx], args)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())

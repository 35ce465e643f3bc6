"""Does each shipped model's drift window stay quiet on clothes and alert on a shift? Streams of
answers through ``model_store.drift.Window``, as the service's monitor keeps it.

    python -m benchmarks.drift_streams --write BENCHMARKS.md

- in-distribution: ``--images`` (100,000) Fashion-MNIST test images drawn at random with
  replacement, into an empty window; every ``--every`` images the window's figures are compared
  with the levels for the answers it holds, from its first 100 on. Goal: no alert at all.
- restarts: ``--restarts`` (100) streams of a window's worth of test images, each into an empty
  window, as a service restarted that many times sees them: 100,000 images judged while the window
  fills, against the levels for the answers it holds. Goal: no alert at all.
- shifted after a lead: ``--lead`` (2,000) test images, then images of one other kind: digits,
  photographs and noise (``benchmarks.ood_sets``), test images blurred, at low contrast or rotated,
  or test images of footwear only (clothes the model knows, in other shares). Goal: an alert within
  1,000 images of the shift; the table says after how many, and by which statistics.
- shifted from the first image: the same kinds of image from the start, into an empty window, as a
  service fed the wrong images from its first request sees them. Goal: an alert within 200 images.

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
FIRST_GOAL_IMAGES = 200  # ... and a stream shifted from its first image within this many


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = [DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE]
    parser.add_argument(
        "--onnx", type=Path, nargs="+", default=shipped, help="graphs with a drift reference (default: shipped)"
    )
    parser.add_argument("--images", type=int, default=100_000, help="in-distribution stream length (default: 100000)")
    parser.add_argument(
        "--restarts", type=int, default=100, help="in-distribution streams into an empty window (default: 100)"
    )
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
    full = [reading for _, _, reading in calm if reading and reading.answers == engine.drift_reference.window]
    highest = {s: max(reading.figures[s] for reading in full) for s in STATISTICS}
    # how close the stream came to a level, at any fill: a figure over the level it was judged against
    window = engine.drift_reference.window
    filling = [
        look
        for _ in range(args.restarts)
        for look in replay(Window(engine.drift_reference), [(held_in, rng.integers(0, len(test), window))], args.every)
    ]
    closest = {s: max(r.figures[s] / r.levels[s] for _, _, r in calm + filling if r) for s in STATISTICS}
    first_looks = {}
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
        looks = replay(Window(engine.drift_reference), [(shifted, after)], args.every)
        first_looks[name] = next(((seen, alerts) for seen, alerts, _ in looks if alerts), (None, []))
    return {
        "name": path.stem,
        "levels": levels,
        "highest": highest,
        "closest": closest,
        "from_first": first_looks,
        "minimum": engine.drift_reference.minimum_answers,
        "window": window,
        "calm": alerted,
        "restarts": [seen for seen, alerts, _ in filling if alerts],
        "restart_looks": sum(reading is not None for _, _, reading in filling),
        "looks": len(calm),
        "shifts": shifts,
    }


def report(results: list[dict], args) -> str:
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.drift_streams "
        f"--images {args.images} --restarts {args.restarts} --lead {args.lead} --every {args.every} --seed {args.seed}`. The window: the "
        f"model's last {results[0]['window']:,} answers, looked at every {args.every} images, each stream into an empty "
        f"one; judged from {results[0]['minimum']} answers on, against the levels fitted for as many.",
        "",
        "| model | stream | images | looks with an alert | goal |",
        "|---|---|---:|---:|---|",
    ]
    for r in results:
        goal = "met" if not r["calm"] else "**missed**"
        lines.append(
            f"| {r['name']} | Fashion-MNIST test images, drawn at random | {args.images:,} | {len(r['calm'])} of {r['looks']:,} | {goal} |"
        )
        goal = "met" if not r["restarts"] else "**missed**"
        lines.append(
            f"| {r['name']} | the same, {args.restarts} times {r['window']:,} into an empty window (judged while it fills) "
            f"| {args.restarts * r['window']:,} | {len(r['restarts'])} of {r['restart_looks']:,} | {goal} |"
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
    lines += [
        "",
        f"| model | shifted from the first image | first alert, images | statistics above their level then | goal (within {FIRST_GOAL_IMAGES}) |",
        "|---|---|---:|---|---|",
    ]
    for r in results:
        for name, (seen, alerts) in r["from_first"].items():
            met = seen is not None and seen <= FIRST_GOAL_IMAGES
            shown = "none in 2 windows" if seen is None else f"{seen:,}"
            lines.append(
                f"| {r['name']} | {name} | {shown} | {', '.join(alerts) or '-'} | {'met' if met else '**missed**'} |"
            )
    lines += ["", "| model | | " + " | ".join(STATISTICS) + " |", "|---|---|" + "---:|" * len(STATISTICS)]
    for r in results:
        lines.append(
            f"| {r['name']} | level, full window | " + " | ".join(f"{r['levels'][s]:.4g}" for s in STATISTICS) + " |"
        )
        lines.append(
            f"| {r['name']} | highest of a full window in the in-distribution stream | "
            + " | ".join(f"{r['highest'][s]:.4g}" for s in STATISTICS)
            + " |"
        )
        lines.append(
            f"| {r['name']} | highest figure / its level in those streams, at any fill | "
            + " | ".join(f"{r['closest'][s]:.2f}" for s in STATISTICS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    if min(args.images, args.lead, args.every, args.restarts) < 1:
        raise SystemExit("error: --images, --lead, --every and --restarts must be at least 1")
    test, labels = fashion_test()
    sets = shifted_sets(np.random.default_rng(args.seed), test, labels)
    text = report([evaluate(path, test, sets, args) for path in args.onnx], args)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Does decoding a photo at the model's scale change what the model answers? Each shipped model's
accuracy on the Fashion-MNIST test images sent as phone-sized JPEGs, decoded both ways its card can
say: "full" (every pixel, then the resize) and "scaled" (libjpeg at 1/2, 1/4 or 1/8 scale first).

    python -m benchmarks.photo_accuracy --write BENCHMARKS.md      # all 10,000 test images, 2000 px
    python -m benchmarks.photo_accuracy --images 500               # a quick look

Each test image is upscaled (bicubic) to ``--side`` pixels square and written as a JPEG at quality
90, as a camera would store a photo of it; square, so that both methods see the garment fill the
frame as in training and only the decoding differs. Every image goes through
``model_store.image_bytes_to_input`` under the model's own card with ``decode`` set each way, then
through the engine the service runs. Reported per model: accuracy each way, the difference in
points, how many answers differ, and the CPU one decode (and resize) took each way. The images are
split between one process per core.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import date

from benchmarks.images import fashion_images, upscaled
from benchmarks.parallel import check_photo_args, over_test_images, photo_args
from benchmarks.report import device, write_section
from model_store import image_bytes_to_input
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE

SECTION, HEADING = "photo-accuracy", "## Photos decoded at the model's scale: accuracy and decode cost"
MODELS = (DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE)
METHODS = ("full", "scaled")


def get_args_parser() -> argparse.ArgumentParser:
    return photo_args(__doc__.splitlines()[0], side=2000)


def score_chunk(indices: list[int], side: int) -> dict:
    """For images ``indices``: each model's answer each way, and the CPU seconds each way took."""
    engines = [OnnxClassifier(path, "cpu", threads=1) for path in MODELS]
    images = fashion_images(max(indices) + 1)
    answers = {(m, way): [] for m in range(len(MODELS)) for way in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    for index in indices:
        photo = upscaled(images[index], side)
        for m, engine in enumerate(engines):
            for way in METHODS:
                card = dataclasses.replace(engine.card, decode=way)
                start = time.process_time()
                pixels = image_bytes_to_input(photo, card)
                if m == 0:  # both cards ask for the same 1x28x28 input: time one
                    seconds[way] += time.process_time() - start
                answers[(m, way)].append(int(engine.logits(pixels[None]).argmax()))
    return {"answers": answers, "seconds": seconds}


def measure(args: argparse.Namespace) -> dict:
    parts, answers = over_test_images(score_chunk, args)
    seconds = {way: sum(p["seconds"][way] for p in parts) for way in METHODS}
    return {"answers": answers, "seconds": seconds, "photo_bytes": len(upscaled(fashion_images(1)[0], args.side))}


def report(result: dict, args: argparse.Namespace) -> str:
    from training.fashion_mnist_files import load_fashion_mnist

    labels = load_fashion_mnist("test")[1][: args.images]
    ms = {way: 1000 * result["seconds"][way] / args.images for way in METHODS}
    lines = [
        f"Device: {device()}. Date: {date.today()}. Command: `python -m benchmarks.photo_accuracy --images "
        f"{args.images} --side {args.side}`. {args.images:,} Fashion-MNIST test images, each upscaled to "
        f"{args.side}x{args.side} and stored as a JPEG at quality 90 (about {result['photo_bytes'] / 1024:,.0f} KB), "
        "through `model_store.image_bytes_to_input` with each way of decoding, then the shipped engine.",
        "",
        "| model | accuracy, full decode | accuracy, scaled decode | difference | answers that differ |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, path in enumerate(MODELS):
        full, scaled = result["answers"][(m, "full")], result["answers"][(m, "scaled")]
        acc_full, acc_scaled = (full == labels).mean(), (scaled == labels).mean()
        lines.append(
            f"| {path.stem} | {acc_full:.4f} | {acc_scaled:.4f} | {100 * (acc_scaled - acc_full):+.2f} points | "
            f"{int((full != scaled).sum())} of {args.images:,} |"
        )
    lines += [
        "",
        f"CPU per photo, decode and resize to 1x28x28: full {ms['full']:.1f} ms, scaled {ms['scaled']:.1f} ms "
        f"({ms['full'] / ms['scaled']:.1f}x less).",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    check_photo_args(args)
    text = report(measure(args), args)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

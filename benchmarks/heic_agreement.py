"""Is a HEIC answered as the same photo as a JPEG? Each shipped model's answers on the Fashion-MNIST
test images written both ways, decoded as the service decodes them.

    python -m benchmarks.heic_agreement --write BENCHMARKS.md      # all 10,000 test images, 512 px
    python -m benchmarks.heic_agreement --images 500               # a quick look

Each test image is upscaled (bicubic) to ``--side`` pixels square, as ``benchmarks.photo_accuracy``
does, and written as a JPEG at quality 90 and as a HEIC at pillow-heif's default quality (x265, as
an iPhone's HEVC). Both go through ``model_store.image_bytes_to_input`` under the model's own card
(the JPEG decoded at the model's scale, the HEIC whole: libheif cannot scale), then the engine the
service runs. Reported per model: how many answers agree, each way's accuracy, and the CPU one
decode took each way. Not 12 MP: x265 takes about 14 s to write one, 40 hours for the test set;
512 px is one HEIC tile and takes 0.1 s. The images are split between one process per core.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

from benchmarks.images import fashion_images, upscaled
from benchmarks.parallel import check_photo_args, over_test_images, photo_args
from benchmarks.report import device, write_section
from model_store import image_bytes_to_input
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE

SECTION, HEADING = "heic-agreement", "## HEIC against JPEG: the same photos, the same answers?"
MODELS = (DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE)
FORMATS = ("JPEG", "HEIF")


def get_args_parser() -> argparse.ArgumentParser:
    return photo_args(__doc__.splitlines()[0], side=512)


def score_chunk(indices: list[int], side: int) -> dict:
    """For images ``indices``: each model's answer on each format, the CPU seconds each format's
    decodes took (for the first model's card), and the files' bytes."""
    engines = [OnnxClassifier(path, "cpu", threads=1) for path in MODELS]
    images = fashion_images(max(indices) + 1)
    answers = {(m, fmt): [] for m in range(len(MODELS)) for fmt in FORMATS}
    seconds, sizes = dict.fromkeys(FORMATS, 0.0), dict.fromkeys(FORMATS, 0)
    for index in indices:
        for fmt in FORMATS:
            photo = upscaled(images[index], side, fmt)
            sizes[fmt] += len(photo)
            for m, engine in enumerate(engines):
                start = time.process_time()
                pixels = image_bytes_to_input(photo, engine.card)
                if m == 0:
                    seconds[fmt] += time.process_time() - start
                answers[(m, fmt)].append(int(engine.logits(pixels[None]).argmax()))
    return {"answers": answers, "seconds": seconds, "sizes": sizes}


def measure(args: argparse.Namespace) -> dict:
    parts, answers = over_test_images(score_chunk, args)
    total = {what: {fmt: sum(p[what][fmt] for p in parts) for fmt in FORMATS} for what in ("seconds", "sizes")}
    return {"answers": answers, **total}


def report(result: dict, args: argparse.Namespace) -> str:
    from training.fashion_mnist_files import load_fashion_mnist

    labels = load_fashion_mnist("test")[1][: args.images]
    ms = {fmt: 1000 * result["seconds"][fmt] / args.images for fmt in FORMATS}
    kb = {fmt: result["sizes"][fmt] / args.images / 1024 for fmt in FORMATS}
    lines = [
        f"Device: {device()}. Date: {date.today()}. Command: `python -m benchmarks.heic_agreement --images "
        f"{args.images} --side {args.side}`. {args.images:,} Fashion-MNIST test images, each upscaled to "
        f"{args.side}x{args.side} and written as a JPEG at quality 90 (mean {kb['JPEG']:,.1f} KB) and as a HEIC at "
        f"pillow-heif's default quality (mean {kb['HEIF']:,.1f} KB), through `model_store.image_bytes_to_input` "
        "under each model's own card, then the shipped engine.",
        "",
        "| model | answers that agree | accuracy, JPEG | accuracy, HEIC |",
        "|---|---:|---:|---:|",
    ]
    for m, path in enumerate(MODELS):
        jpeg, heic = result["answers"][(m, "JPEG")], result["answers"][(m, "HEIF")]
        lines.append(
            f"| {path.stem} | {(jpeg == heic).mean():.2%} ({int((jpeg != heic).sum())} of {args.images:,} differ) | "
            f"{(jpeg == labels).mean():.4f} | {(heic == labels).mean():.4f} |"
        )
    lines += [
        "",
        f"CPU per photo, decode and resize to 1x28x28: JPEG {ms['JPEG']:.2f} ms (decoded at the model's scale), "
        f"HEIC {ms['HEIF']:.2f} ms (decoded whole).",
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

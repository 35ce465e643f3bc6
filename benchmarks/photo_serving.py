"""What a phone photo costs the service: the shipped LeNet asked about photos, its card's decode
"scaled" against "full", on one `bentoml serve`, loaded by wrk in turn.

    python -m benchmarks.photo_serving                         # c=1 and 8, 10 s, 3 rounds
    python -m benchmarks.photo_serving --write BENCHMARKS.md
    python -m benchmarks.photo_serving --before /tmp/before    # and another checkout's service, in turn

The shipped LeNet graph is served twice under two names, its card saying decode "scaled"
(``lenet-scaled``) and "full" (``lenet-full``), so the two ways of decoding meet the same server,
the same batches and the same limits. Photos (``benchmarks.images.fashion_photos``): Fashion-MNIST
test images upscaled into a phone's frame with a sensor's grain, one per request, multipart as
curl -F sends them. Ways:

- jpeg-12mp-scaled / jpeg-12mp-full: 4000x3000 JPEGs, quality 90;
- jpeg-48mp-scaled: 8000x6000 JPEGs (a full decode refuses them: over the 40-megapixel limit);
- heic-12mp-scaled: 4000x3000 HEICs, as an iPhone stores a photo (pillow-heif's default quality);
  only 4 distinct ones, as x265 takes about 14 s to write each; no HEIC decoder can scale;
- png-12mp-scaled: 4000x3000 PNGs without grain (a noisy one is 36 MB), which no method can decode
  at a smaller scale;
- webp-1024-scaled: 1024x768 WebPs;
- jpeg-12mp-fastapi: the 12 MP JPEGs to the hand-written FastAPI + PyTorch server
  (``benchmarks.fastapi_baseline``, the shipped LeNet's architecture) decoding the same way
  (``BASELINE_DECODE=naive``), in FastAPI's thread pool;
- jpeg-12mp-floor: the 12 MP JPEGs to the bare Starlette floor (``benchmarks.starlette_floor``) on the
  same graph, decoding as a user would write it (``FLOOR_DECODE=naive``: ``Image.open(...).convert(...)
  .resize(...)``, every pixel), one image per request on its event loop;
- with ``--before CHECKOUT``, WAY-before for each way of the service: the same photos to the same
  model of that checkout's service (a git worktree of the commit before a change), so a change is
  measured before and after in one run.

``--ways`` runs some of them. Server CPU per request is read from /proc for the server's whole
process tree (decoder processes included), so it is the photo's whole cost to the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from benchmarks import turns
from benchmarks.images import fashion_photos
from benchmarks.load import write_bodies
from benchmarks.peers import lenet_checkpoint
from benchmarks.report import write_section
from benchmarks.turns import Server, load_in_turn, ways_table
from model_store.card import ONNX_METADATA_KEY, ModelCard
from model_store.store import DEFAULT_MODEL_FILE

SECTION = "## Phone photos: what decoding at the model's scale saves the service"
PHOTOS = {  # way -> (frame, format, grain): grain that keeps each file under the 10 MB body limit
    "jpeg-12mp": ((4000, 3000), "JPEG", 8.0),
    "jpeg-48mp": ((8000, 6000), "JPEG", 3.0),
    "heic-12mp": ((4000, 3000), "HEIF", 8.0),
    "png-12mp": ((4000, 3000), "PNG", 0.0),
    "webp-1024": ((1024, 768), "WEBP", 8.0),
}
WAYS = (
    "jpeg-12mp-scaled",
    "jpeg-12mp-full",
    "jpeg-12mp-fastapi",
    "jpeg-12mp-floor",
    "jpeg-48mp-scaled",
    "heic-12mp-scaled",
    "png-12mp-scaled",
    "webp-1024-scaled",
)
HEIC_PHOTOS = 4  # distinct HEICs at most: x265 takes about 14 s to write a 12 MP one
PEERS = ("fastapi", "floor")  # servers besides the service, decoding as a user writes it
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--no-access-log", "--loop", "uvloop", "--http", "httptools"]


def with_decode(decode: str, out: Path) -> Path:
    """The shipped LeNet with its card's decode set to ``decode``, written to ``out``."""
    import onnx

    model = onnx.load(DEFAULT_MODEL_FILE)
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            prop.value = dataclasses.replace(ModelCard.from_json(prop.value), decode=decode).to_json()
    onnx.save(model, out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = turns.get_args_parser(__doc__.splitlines()[0], levels=(1, 8), images=16)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="the ways to run (default: all)")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout (a git worktree of the commit before a change): its service answers "
        "each way of the service as WAY-before, in turn with this one's",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    if args.before is not None and not (args.before / "serving" / "service.py").is_file():
        raise SystemExit(f"error: --before {args.before} is not a checkout of this project (no serving/service.py)")
    twins = [f"{way}-before" for way in args.ways if args.before and way.rsplit("-", 1)[1] not in PEERS]
    wanted = [*args.ways, *twins]
    with tempfile.TemporaryDirectory(prefix="photo-serving-") as folder:
        workdir = Path(folder)
        models = {
            f"lenet-{decode}": with_decode(decode, workdir / f"lenet-{decode}.onnx") for decode in ("scaled", "full")
        }
        sizes, ways = {}, {}
        for kind, (frame, fmt, grain) in PHOTOS.items():
            if not any(way.startswith(kind + "-") for way in wanted):
                continue
            count = min(args.images, HEIC_PHOTOS) if fmt == "HEIF" else args.images
            photos = fashion_photos(count, frame, fmt, grain)
            sizes[kind] = sum(map(len, photos)) / len(photos)
            bodies = write_bodies(workdir / kind, photos, f"image/{fmt.lower()}")
            for way in wanted:
                if way.startswith(kind + "-"):
                    ways[way] = way_of(way, bodies)
        servers = {
            name: Server([sys.executable, *UVICORN, app], env, "/healthz")
            for name, (app, env) in peers(workdir).items()
            if any(way.endswith("-" + name) for way in wanted)
        }
        if args.before:
            servers["before"] = turns.service(workdir / "bentoml-before", models, args.before, shipped=False)
        runs = load_in_turn(workdir, {way: ways[way] for way in wanted}, args, models, servers)
    files = ", ".join(f"{kind} {size / 2**20:.2f} MB" for kind, size in sizes.items())
    about = (
        "One `bentoml serve` of the shipped models plus the shipped LeNet twice, its card saying decode "
        f'"scaled" and "full" (SERVING_LOG_REQUESTS=false); the hand-written FastAPI + PyTorch server (1 worker, '
        "its thread pool) and the bare floor, both decoding every pixel as a user writes it; "
        f"{args.images} distinct photos per way ({min(args.images, HEIC_PHOTOS)} HEICs), mean file size: "
        f"{files}. wrk in a closed loop; each way in turn at each level in each round, the median round by "
        "requests/s shown; server CPU is the whole process tree's, decoder processes included."
    )
    if args.before:
        about += f" WAY-before: the same photos and model, to the service of the checkout at `{args.before}`."
    options = " ".join(
        ([f"--ways {' '.join(args.ways)}"] if args.ways != list(WAYS) else [])
        + ([f"--before {args.before}"] if args.before else [])
    )
    baseline = "jpeg-12mp-full" if "jpeg-12mp-full" in wanted else wanted[0]
    text = ways_table(runs, args, "photo_serving", about, wanted, baseline, baseline, options)
    print(f"{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "photo-serving", text, SECTION)


def way_of(way: str, bodies) -> tuple:
    """What load_in_turn asks for ``way``: its path, its bodies, and the server when not the service."""
    how = way.removesuffix("-before").rsplit("-", 1)[1]
    if how in PEERS:
        return ("/classify", bodies, how)
    path = f"/classify?model=lenet-{how}"
    return (path, bodies, "before") if way.endswith("-before") else (path, bodies)


def peers(workdir: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """The servers the service is measured against: name -> (app, environment)."""
    return {
        "floor": ("benchmarks.starlette_floor:app", {"FLOOR_ONNX": str(DEFAULT_MODEL_FILE), "FLOOR_DECODE": "naive"}),
        "fastapi": (
            "benchmarks.fastapi_baseline:app",
            {"BASELINE_CHECKPOINT": str(lenet_checkpoint(workdir / "lenet.pt")), "BASELINE_DECODE": "naive"},
        ),
    }


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

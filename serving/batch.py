"""Offline batch scoring: every file under a folder -> one CSV row each.

    python -m serving.batch photos/ --output predictions.csv

Same preprocessing (``model_store.image_bytes_to_input``) and engine (``OnnxClassifier``) as the
HTTP service. Files are decoded on a thread pool while the previous batch runs; a file that is
not a usable image gets its reason in the ``error`` column and the run goes on.

Every entry below the folder gets a row, in name order, depth first. Only regular files inside the
folder are read: symlinks to folders are not followed, a symlink leading out of the folder is not
read, and dangling or looping symlinks, FIFOs, sockets and devices are never opened; each of these
gets its reason in ``error``. Hidden files and folders are skipped and counted in the summary.

The CSV is UTF-8, except that a file name which is not valid UTF-8 is written as its bytes on
disk (``errors="surrogateescape"``), so every name round-trips exactly. A text cell starting with
``=``, ``+``, ``-``, ``@``, tab or carriage return is written with a leading ``'`` so that a
spreadsheet shows it as text instead of running it as a formula (OWASP, "CSV Injection").
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import stat
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from model_store import ImageError, ModelCard, image_bytes_to_input
from model_store.cli import prog
from model_store.files import atomic_output
from serving.engine import OnnxClassifier, top_k

logger = logging.getLogger(__name__)

COLUMNS = ("path", "label", "probability", "top_k", "error")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
SPECIAL_FILES = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class Entry(NamedTuple):
    name: str  # path below the folder, "/"-separated: the CSV's path column
    path: Path  # the file to read (a symlink's resolved target)
    problem: str = ""  # why it is not read; empty for a regular file


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("serving.batch", "cnn-score"), description="Score every image under a folder."
    )
    parser.add_argument("folder", type=Path, help="folder to score, recursively")
    parser.add_argument("--output", type=Path, required=True, help="CSV file to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default="fashion-lenet:latest", help="BentoML store tag (default: fashion-lenet:latest)"
    )
    source.add_argument("--onnx", type=Path, default=None, help="an exported .onnx file instead of a store tag")
    parser.add_argument("--batch-size", type=int, default=256, help="images per inference call (default: 256)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding threads (default: CPU count)"
    )
    return parser


def list_files(folder: Path) -> tuple[list[Entry], int]:
    """Every non-hidden entry below ``folder`` in name order, depth first; and how many hidden entries were skipped.

    One ``scandir`` per folder and no ``stat`` for plain files and folders. An explicit stack, not
    recursion, so a deeply nested tree cannot exhaust Python's recursion limit.
    """
    root = folder.resolve()
    entries, hidden = [], 0
    stack = [("", iter(_sorted_scandir(folder)))]
    while stack:
        prefix, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
        elif child.name.startswith("."):
            hidden += 1
        elif child.is_dir(follow_symlinks=False):
            try:
                stack.append((f"{prefix}{child.name}/", iter(_sorted_scandir(child.path))))
            except OSError as err:
                entries.append(Entry(prefix + child.name, Path(child.path), f"cannot list folder: {err}"))
        else:
            try:
                entries.append(_classify(child, prefix + child.name, root))
            except OSError as err:  # vanished or changed since the folder was listed
                entries.append(Entry(prefix + child.name, Path(child.path), str(err)))
    return entries, hidden


def _sorted_scandir(directory: str | os.PathLike) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted(it, key=lambda entry: entry.name)


def _classify(child: os.DirEntry, name: str, root: Path) -> Entry:
    """The entry to read, or the reason it is not read; a symlink is judged by its resolved target."""
    path = Path(child.path)
    if child.is_file(follow_symlinks=False):
        return Entry(name, path)
    if child.is_symlink():
        link = os.readlink(path)
        try:
            path = Path(os.path.realpath(path, strict=True))
        except OSError as err:
            return Entry(name, path, f"dangling or looping symlink to {link!r}: {err.strerror}")
        if not path.is_relative_to(root):
            return Entry(name, path, f"symlink to {link!r} leads outside the folder; not read")
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return Entry(name, path)
    if stat.S_ISDIR(mode):
        return Entry(name, path, "symlink to a folder; folder symlinks are not followed")
    kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
    return Entry(name, path, f"not a regular file but a {kind}; not opened")


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file. Non-blocking and not following a final symlink: a FIFO or link
    swapped in since the listing is refused rather than waited on or followed."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is no longer a regular file; not read")
        return f.read()


def _load(entry: Entry, card: ModelCard) -> np.ndarray | str:
    """The model input, or the reason the entry cannot be used."""
    if entry.problem:
        return entry.problem
    try:
        return image_bytes_to_input(_read_regular_file(entry.path), card)
    except (ImageError, OSError) as err:
        return str(err)
    except Exception as err:  # a decoder bug on one crafted file costs that file's row, not the run
        logger.warning("unexpected error decoding %s", entry.name, exc_info=True)
        kind = f"{type(err).__module__}.{type(err).__qualname__}".removeprefix("builtins.")
        return f"{kind}: {err}"


def score(
    classifier: OnnxClassifier, entries: list[Entry], batch_size: int, k: int, workers: int
) -> Iterator[tuple[Entry, dict | str]]:
    """(entry, prediction or error) for each entry, in order; decoding of batch i+1 overlaps inference of batch i."""
    chunks = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: [pool.submit(_load, e, classifier.card) for e in chunk]  # noqa: E731
        pending: list[Future] = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [x for x in loaded if not isinstance(x, str)]
            probabilities = iter(classifier.predict(np.stack(good)) if good else [])
            for entry, item in zip(chunk, loaded):
                yield (
                    entry,
                    item if isinstance(item, str) else top_k(next(probabilities), classifier.card.class_names, k),
                )


def _cell(text: str) -> str:
    """``text`` as a spreadsheet will show it, never run it: a leading ``'`` when it starts like a formula."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def main(args: argparse.Namespace) -> tuple[int, int]:
    if not args.folder.is_dir():
        raise FileNotFoundError(f"folder {args.folder} does not exist or is not a folder")
    if args.batch_size < 1 or args.workers < 1:
        raise ValueError(f"--batch-size and --workers must be at least 1, got {args.batch_size} and {args.workers}")
    if args.onnx is not None:
        path = args.onnx
    else:
        from model_store.store import MODEL_FILE, open_model

        path = open_model(args.model).path_of(MODEL_FILE)
    classifier = OnnxClassifier(path)
    if not 1 <= args.top_k <= classifier.card.num_classes:
        raise ValueError(f"--top-k must be from 1 to {classifier.card.num_classes}, got {args.top_k}")
    entries, hidden = list_files(args.folder)
    failed = 0
    # surrogateescape: a file name that is not UTF-8 goes into the CSV as its bytes on disk
    with atomic_output(args.output, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        results = score(classifier, entries, args.batch_size, args.top_k, args.workers)
        for entry, result in tqdm(results, total=len(entries), unit="img", disable=None):
            if isinstance(result, str):
                failed += 1
                row = (entry.name, "", "", "", result)
            else:
                ranked = ";".join(f"{r['label']}:{r['probability']:.4f}" for r in result["top_k"])
                row = (entry.name, result["label"], f"{result['probability']:.6f}", ranked, "")
            writer.writerow([_cell(text) for text in row])
    print(
        f"scored {len(entries) - failed} of {len(entries)} files ({failed} failed) with {classifier.card.arch} on "
        f"{classifier.provider}; {hidden} hidden entries skipped; wrote {args.output}"
    )
    return len(entries) - failed, failed


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, OSError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

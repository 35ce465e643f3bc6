"""Captured answers: the images a service was unsure of, and a sample of the rest, kept with what it
answered, for people to label. ``serving.capture`` writes them; ``/review`` and ``python -m
model_store captures`` read, label and remove them; :func:`export_folder` hands the labelled ones to
``training`` as an image folder. Torch-free: serving imports it.

A store is a local folder (the standard library's files) or an object-store prefix
(``s3://bucket/prefix``, anything ``pyarrow.fs`` opens), one folder per model name::

    <model>/images/<sha256>.<ext>      the bytes as received, stored once per content
    <model>/rows/<sha256>.json         what the model answered: the capture's manifest row
    <model>/labels/<time>-<id>.jsonl   labels, appended in parts and never rewritten

The order of writes makes a kill at any moment safe: an image is written before its row and a row
is removed before its image, so every row has its image; an image left without a row (a write or
a removal cut short) is removed by :meth:`CaptureStore.repair` at start-up. Each file appears
whole: locally written to a temp name and renamed, on an object store in one PUT.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, NamedTuple
from urllib.parse import quote

from model_store.errors import UsageError
from model_store.files import atomic_output

REASONS = ("out_of_distribution", "low_confidence", "sample")  # why an image was kept: unsure, or drawn
NOT_IN_DOMAIN = "not_in_domain"  # a label for an image that is no class at all: an OOD example
SHA = re.compile(r"[0-9a-f]{64}")
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # BentoML's model names: also safe as a folder name
# The file types a capture is stored as, by the bytes' signature; anything else is kept as .bin.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "webp": "image/webp",
    "heic": "image/heic",
    "bin": "application/octet-stream",
}
# Which reviewed images a fine-tune holds out, decided by the image's own SHA-256 so that the fine-tune
# (training.reviewed) and the service's rollout (serving.rollout), which scores both models on the
# labelled captures, agree without sharing a list: one in HELD_OUT_EVERY, the same ones every time.
HELD_OUT_EVERY = 5
READ_THREADS = 16  # an object-store GET waits tens of milliseconds: keep many in flight
TEMP_SUFFIX = ".tmp"


def extension(data: bytes) -> str:
    """The file extension of an encoded image, from its first bytes."""
    head = bytes(data[:16])
    for signature, ext in SIGNATURES:
        if head.startswith(signature):
            return ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "heic"
    return "bin"


def folder_name(label: str) -> str:
    """A label as one folder name: "/" and "%" percent-encoded (Fashion-MNIST has "T-shirt/top")."""
    return quote(label, safe=" ")


def is_held_out(sha: str) -> bool:
    """Whether a fine-tune keeps the reviewed image of this SHA-256 out of training (HELD_OUT_EVERY)."""
    return int(sha[:8], 16) % HELD_OUT_EVERY == 0


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA.fullmatch(sha):
        raise UsageError(f"not a capture id: {str(sha)[:80]!r}; an id is the image's SHA-256, 64 hex digits")
    return sha


def check_model(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise UsageError(f"not a model name: {str(name)[:80]!r}")
    return name


class Listed(NamedTuple):
    name: str  # the file's name in its folder
    path: str
    mtime: float | None  # seconds since the epoch; None where the store does not say


class LocalFiles:
    """A local folder: what the store needs of a file system, with the standard library only (the
    container image has no pyarrow: it stores captures on a mounted volume)."""

    local = True

    def list(self, folder: str, folders: bool = False) -> list[Listed]:
        try:
            with os.scandir(folder) as entries:
                return [
                    Listed(e.name, e.path, e.stat().st_mtime)
                    for e in entries
                    if (e.is_dir(follow_symlinks=False) if folders else e.is_file(follow_symlinks=False))
                ]
        except FileNotFoundError:
            return []

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        with atomic_output(path) as f:  # a temp file, then a rename
            f.write(data)

    def delete(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)


class ArrowFiles:
    """An object-store prefix through ``pyarrow.fs`` (S3, GCS, HDFS): an object appears only once
    its PUT completes, so a write needs no rename."""

    local = False

    def __init__(self, fs):
        self.fs = fs

    def list(self, folder: str, folders: bool = False) -> list[Listed]:
        from pyarrow.fs import FileSelector, FileType

        wanted = FileType.Directory if folders else FileType.File
        infos = self.fs.get_file_info(FileSelector(folder, allow_not_found=True))
        return [
            Listed(i.base_name, i.path, i.mtime.timestamp() if i.mtime else None) for i in infos if i.type == wanted
        ]

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass


class CaptureStore:
    """One store of captures (see the module's docstring for its layout)."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" not in uri or uri.startswith("file://"):
            self.files, self.root = LocalFiles(), os.path.abspath(uri.removeprefix("file://"))
            return
        try:
            import pyarrow.fs
        except ImportError:
            raise UsageError(
                f"capture store {uri}: an object store needs pyarrow, which is not installed here"
            ) from None
        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        except Exception as err:  # pyarrow's errors name the URI's problem
            raise UsageError(f"capture store {uri}: {err}") from None
        self.files, self.root = ArrowFiles(fs), root.rstrip("/")

    def path(self, model: str, *parts: str) -> str:
        return "/".join([self.root, check_model(model), *parts])

    # Writing. ----------------------------------------------------------------------------------

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` whole, or not at all."""
        self.files.write(path, data)

    def add(self, model: str, row: dict, data: bytes) -> None:
        """Store a capture: its image, then its row (``row["sha256"]`` names both)."""
        sha = check_sha(row["sha256"])
        self.put(self.path(model, "images", f"{sha}.{row['ext']}"), data)
        self.put(self.path(model, "rows", f"{sha}.json"), json.dumps(row, sort_keys=True).encode())

    def remove(self, model: str, sha: str) -> dict | None:
        """Remove a capture, its row first, then its image; its row, or None when there was none."""
        row = self.row(model, check_sha(sha))
        if row is None:
            return None
        self.files.delete(self.path(model, "rows", f"{sha}.json"))
        self.files.delete(self.path(model, "images", f"{sha}.{row['ext']}"))
        return row

    def add_labels(self, model: str, labels: list[dict]) -> None:
        """Append labels as one part: rows of ``sha256``, ``label``, ``by`` and ``time``."""
        if not labels:
            return
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}.jsonl"
        text = "".join(json.dumps(label, sort_keys=True) + "\n" for label in labels)
        self.put(self.path(model, "labels", name), text.encode())

    # Reading. ----------------------------------------------------------------------------------

    def models(self) -> list[str]:
        try:
            found = self.files.list(self.root, folders=True)
        except OSError as err:
            raise UsageError(f"capture store {self.uri} cannot be read: {err}") from None
        return sorted(f.name for f in found if MODEL_NAME.fullmatch(f.name))

    def _listed(self, model: str, folder: str) -> list[Listed]:
        return self.files.list(self.path(model, folder))

    def _read(self, path: str) -> bytes:
        return self.files.read(path)

    def row(self, model: str, sha: str) -> dict | None:
        try:
            return json.loads(self._read(self.path(model, "rows", f"{check_sha(sha)}.json")))
        except FileNotFoundError:
            return None

    def rows(self, model: str) -> list[dict]:
        """Every capture's row, oldest first."""
        paths = [i.path for i in self._listed(model, "rows") if SHA.fullmatch(i.name.removesuffix(".json"))]
        with ThreadPoolExecutor(1 if self.files.local else READ_THREADS) as pool:
            found = list(pool.map(self._read_missing_ok, paths))
        return sorted((json.loads(text) for text in found if text is not None), key=lambda r: (r["time"], r["sha256"]))

    def _read_missing_ok(self, path: str) -> bytes | None:
        try:
            return self._read(path)
        except FileNotFoundError:  # removed since it was listed
            return None

    def image(self, model: str, sha: str) -> tuple[bytes, str] | None:
        """A capture's bytes and media type, or None."""
        row = self.row(model, sha)
        if row is None:
            return None
        try:
            return self._read(self.path(model, "images", f"{sha}.{row['ext']}")), MEDIA_TYPES[row["ext"]]
        except FileNotFoundError:
            return None

    def labels(self, model: str) -> dict[str, dict]:
        """Each labelled capture's label: the last given (by time, then the order of the parts)."""
        parts = sorted(i.path for i in self._listed(model, "labels") if i.name.endswith(".jsonl"))
        last: dict[str, dict] = {}
        for part in parts:
            for line in self._read(part).decode().splitlines():
                label = json.loads(line)
                if label["sha256"] not in last or label["time"] >= last[label["sha256"]]["time"]:
                    last[label["sha256"]] = label
        return last

    # Start-up. ---------------------------------------------------------------------------------

    def repair(self, model: str, grace_s: float = 600.0) -> int:
        """Remove the images that have no row, and temp files, older than ``grace_s`` (another
        replica may be between an image and its row); returns how many were removed."""
        now = time.time()
        rows = {i.name.removesuffix(".json") for i in self._listed(model, "rows")}
        removed = 0
        for folder in ("images", "rows", "labels"):
            for info in self._listed(model, folder):
                stale = info.mtime is None or now - info.mtime > grace_s
                temp = info.name.endswith(TEMP_SUFFIX)
                orphan = folder == "images" and info.name.split(".")[0] not in rows
                if (temp or orphan) and stale:
                    self.files.delete(info.path)
                    removed += 1
        return removed


# Review: what to label first, and counts. -------------------------------------------------------


def margin(row: dict) -> float:
    """The top probability less the second: small means the model hesitated between two classes."""
    top = [c["probability"] for c in row["top_k"]] + [0.0, 0.0]
    return top[0] - top[1]


def review_order(rows: list[dict], labels: dict[str, dict]) -> list[dict]:
    """The unlabelled captures, most useful to label first: out of distribution first, then the
    smallest margin; a content is stored once, so each image appears once."""
    waiting = [row for row in rows if row["sha256"] not in labels]
    return sorted(waiting, key=lambda r: (r["reason"] != "out_of_distribution", margin(r), -r["time"]))


def counts(rows: list[dict], labels: dict[str, dict]) -> dict:
    """Captures per reason, labels per label, and how many wait for one."""
    present = {row["sha256"] for row in rows}
    by_label: dict[str, int] = {}
    for sha, label in labels.items():
        if sha in present:
            by_label[label["label"]] = by_label.get(label["label"], 0) + 1
    by_reason = {reason: sum(row["reason"] == reason for row in rows) for reason in REASONS}
    labelled = sum(by_label.values())
    return {
        "captures": len(rows),
        "labelled": labelled,
        "waiting": len(rows) - labelled,
        "by_reason": by_reason,
        "by_label": dict(sorted(by_label.items())),
    }


def check_label(label: str, class_names: Iterable[str]) -> str:
    allowed = [*class_names, NOT_IN_DOMAIN]
    if label not in allowed:
        raise UsageError(f"not a label of this model: {str(label)[:80]!r}; the labels are {', '.join(allowed)}")
    return label


def label_rows(shas: list[str], labels: list[str], by: str, class_names: tuple[str, ...]) -> list[dict]:
    now = time.time()
    return [
        {"sha256": check_sha(sha), "label": check_label(label, class_names), "by": by, "time": now}
        for sha, label in zip(shas, labels)
    ]


# Interchange. -----------------------------------------------------------------------------------


def export_folder(store: CaptureStore, model: str, output: Path) -> dict[str, int]:
    """The labelled captures as an image folder that ``python -m training train --dataset folder``
    reads as it is: ``<class>/<sha256>.<ext>`` for each class that has one (its name through
    :func:`folder_name`), ``not_in_domain/`` apart
    (training skips it: those are out-of-distribution examples, not a class), and
    ``manifest.parquet``: every capture's row with its label (null where none). Images per folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, labels = store.rows(model), store.labels(model)
    written: dict[str, int] = {}
    for row in rows:
        label = labels.get(row["sha256"])
        if label is None:
            continue
        found = store.image(model, row["sha256"])
        if found is None:
            continue
        with atomic_output(output / folder_name(label["label"]) / f"{row['sha256']}.{row['ext']}") as f:
            f.write(found[0])
        written[label["label"]] = written.get(label["label"], 0) + 1
    table = pa.table(
        {
            "sha256": [r["sha256"] for r in rows],
            "time": [r["time"] for r in rows],
            "model": [r["model"] for r in rows],
            "reason": [r["reason"] for r in rows],
            "answer": [r["label"] for r in rows],
            "probability": [r["probability"] for r in rows],
            "ood_distance": [r.get("ood_distance") for r in rows],
            "bytes": [r["bytes"] for r in rows],
            "file": [f"{r['sha256']}.{r['ext']}" for r in rows],
            "label": [labels[r["sha256"]]["label"] if r["sha256"] in labels else None for r in rows],
            "labelled_by": [labels[r["sha256"]]["by"] if r["sha256"] in labels else None for r in rows],
            "labelled_at": [labels[r["sha256"]]["time"] if r["sha256"] in labels else None for r in rows],
        }
    )
    with atomic_output(output / "manifest.parquet") as f:
        pq.write_table(table, f)
    return dict(sorted(written.items()))


def capture_id(name: str) -> str:
    """The capture id in a file name or path, as :func:`export_folder` names files (``<sha256>.<ext>``),
    also where a tool prefixed it (Label Studio's uploads: ``1a2b3c4d-<sha256>.png``)."""
    found = SHA.findall(name.rsplit("/", 1)[-1].lower())
    if len(found) != 1:
        raise UsageError(f"no capture id (a SHA-256, 64 hex digits) in the file name {name[:200]!r}")
    return found[0]


def read_csv_labels(text: str) -> list[tuple[str, str]]:
    """(capture id, label) pairs of a CSV with a header naming ``path`` (or ``sha256``) and ``label``."""
    reader = csv.DictReader(io.StringIO(text))
    key = "sha256" if reader.fieldnames and "sha256" in reader.fieldnames else "path"
    if not reader.fieldnames or key not in reader.fieldnames or "label" not in reader.fieldnames:
        raise UsageError(f"a labels CSV needs the columns path (or sha256) and label, got {reader.fieldnames}")
    return [(capture_id(row[key].strip()), row["label"].strip()) for row in reader]


def read_label_studio(text: str) -> list[tuple[str, str]]:
    """(capture id, label) pairs of Label Studio's JSON export of an image-classification project:
    each task's ``data.image`` names the file, and its latest annotation's ``choices`` result the
    label. Tasks without a choice (skipped, or cancelled annotations) are left out."""
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"not Label Studio's JSON export: {err}") from None
    if not isinstance(tasks, list):
        raise UsageError("not Label Studio's JSON export: it is a list of tasks")
    pairs = []
    for task in tasks:
        image = str((task.get("data") or {}).get("image", ""))
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        choices = [
            r["value"]["choices"][0]
            for a in annotations[-1:]
            for r in a.get("result") or []
            if r.get("type") == "choices" and r.get("value", {}).get("choices")
        ]
        if image and choices:
            pairs.append((capture_id(image.split("?")[0]), choices[-1]))
    return pairs

"""The output folder: numbered part files, a small manifest, and what a resumed run reads back.

    scores/
      _manifest.json             settings, one record per run; once complete, the totals and the parts
      part-0000-000000.parquet   run 0, part 0
      part-0000-000001.parquet
      part-0001-000000.parquet   the first part written by the first resume

Every file is written to a hidden temp name and renamed once complete (``atomic_output``), so the
folder never shows a half-written file and a SIGKILL loses at most the parts being filled. The
manifest starts with ``_`` and temp files with ``.``, the prefixes that pyarrow, pandas, DuckDB and
Spark skip: they read the folder as one table.

A resumed run reads the ids of every finished part and skips those inputs, so it ends with the same
rows as an uninterrupted run. It is refused when the source, the model, ``top_k`` or the format
differ from the run's, or when its parts hold other columns than this scorer writes (another
version wrote them), naming the difference. One process writes a folder at a time (a lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model_store.errors import UsageError
from model_store.files import atomic_output, remove_stale_temp_files
from scoring.results import SCHEMA, OtherColumns, check_columns, read_csv_ids, row_ids, write_csv

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK = ".lock"
PART = re.compile(r"part-([0-9]{4,})-([0-9]{6,})\.(parquet|csv)")
FORMATS = ("parquet", "csv")


def part_name(run: int, number: int, fmt: str) -> str:
    return f"part-{run:04d}-{number:06d}.{fmt}"


def write_part(path: Path, table: pa.Table, fmt: str) -> None:
    """One part file, whole or not at all."""
    if fmt == "parquet":
        with atomic_output(path, "wb") as f:
            pq.write_table(table, f)
    else:  # surrogateescape: a name that is not UTF-8 goes into the CSV as its bytes on disk
        with atomic_output(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            write_csv(table, f)


class DoneSet:
    """The ids of rows already written, as sorted 16-byte BLAKE2b digests: 16 bytes a row instead of
    a Python string's hundred or so, so ten million ids take 160 MB."""

    def __init__(self, digests: np.ndarray | None = None):
        self._digests = np.unique(digests) if digests is not None else np.empty(0, "S16")

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, row_id: bytes) -> bool:
        key = np.bytes_(_digest(row_id))
        return bool(np.searchsorted(self._digests, key, "right") > np.searchsorted(self._digests, key, "left"))


def _digest(row_id: bytes) -> bytes:
    return hashlib.blake2b(row_id, digest_size=16).digest()


@dataclass
class Finished:
    """What the finished parts of a folder hold."""

    done: DoneSet = field(default_factory=DoneSet)
    rows: int = 0
    failed: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # part name -> rows


def read_parts(folder: Path, ids: bool = True) -> Finished:
    """The row and failure counts of every part file in ``folder``, and with ``ids`` their ids (what
    resume needs; counting alone reads only the ``error`` column of a Parquet part)."""
    digests, rows, failed, parts = [], 0, 0, {}
    for name in sorted(os.listdir(folder)):
        if not PART.fullmatch(name):
            continue
        try:
            part_ids, count, errors = _read_part(folder / name, ids)
        except OtherColumns as err:
            raise UsageError(
                f"cannot add to the run in {folder}: {name} {err}. A run's parts share their columns; "
                "score into a new --output folder"
            ) from None
        except (OSError, ValueError, pa.ArrowException) as err:
            raise UsageError(f"cannot read {folder / name}: {err}; delete it to score its rows again") from None
        digests.append(np.array([_digest(i) for i in part_ids], "S16"))
        rows, failed, parts[name] = rows + count, failed + errors, count
    done = DoneSet(np.concatenate(digests) if digests else None)
    if ids and len(done) != rows:
        logger.warning("%s holds %d rows for %d distinct paths: the input named some twice", folder, rows, len(done))
    return Finished(done, rows, failed, parts)


def _read_part(path: Path, ids: bool) -> tuple[list[bytes], int, int]:
    """A part's ids (when asked for), rows and failed rows."""
    if path.suffix == ".parquet":
        with pq.ParquetFile(path) as part:
            check_columns(part.schema_arrow.names, SCHEMA.names)
            table = part.read(columns=["path", "path_bytes", "error"] if ids else ["error"])
        return row_ids(table) if ids else [], len(table), len(table) - table.column("error").null_count
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        pairs = list(read_csv_ids(f))
    return [i for i, _ in pairs] if ids else [], len(pairs), sum(bad for _, bad in pairs)


class OutputFolder:
    """The folder a scoring run writes: started (or resumed) once, then parts, then finished."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_file = None
        self._manifest: dict = {}

    def start(self, settings: dict, about: dict, engine: str, resume: bool) -> tuple[int, Finished]:
        """Check the folder and record a new run in the manifest; returns the run's number and what
        the finished parts already hold. ``settings`` must match a resumed run's; ``about`` is kept
        for the reader (the model's name and file)."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--output {self.path} is a file; give a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        manifest = self._read_manifest()
        if manifest is None:
            visible = sorted(name for name in os.listdir(self.path) if not name.startswith((".", "_")))
            if visible:
                raise UsageError(
                    f"--output {self.path} is not empty and holds no scoring run ({len(visible)} entries, e.g. "
                    f"{visible[0]!r}); give an empty or new folder"
                )
            if resume:
                logger.info("%s holds no run to resume; starting one", self.path)
            manifest = {"settings": settings, "about": about, "runs": [], "complete": False}
        elif not resume:
            raise UsageError(
                f"--output {self.path} already holds a scoring run ({len(manifest['runs'])} runs, "
                f"{'complete' if manifest['complete'] else 'not complete'}); pass --resume to continue it, "
                "or give an empty or new folder"
            )
        else:
            _check_same(manifest, settings, about)
        remove_stale_temp_files(self.path)  # left by a killed run: hidden, but no use to anyone
        finished = read_parts(self.path)
        run = len(manifest["runs"])
        manifest["runs"].append({"engine": engine, "started": _now(), "finished": None})
        manifest.update(complete=False, about=about)
        self._manifest = manifest
        self._write_manifest()
        return run, finished

    def finish(self, before: Finished, about_run: dict) -> dict:
        """Count what the parts hold now, mark the run and the folder complete; returns the run's record."""
        now = read_parts(self.path, ids=False)
        record = {
            "scored": now.rows - before.rows,
            "failed": now.failed - before.failed,
            **about_run,
            "rows": now.rows,
            "parts": len(now.parts),
        }
        self._manifest["runs"][-1].update(record, finished=_now())
        self._manifest.update(complete=True, rows=now.rows, failed=now.failed, parts=now.parts)
        self._write_manifest()
        return record

    def _lock(self) -> None:
        self._lock_file = open(self.path / LOCK, "a")
        try:  # released by the kernel when this process ends, however it ends
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another scorer is writing to {self.path}; wait for it or stop it") from None

    def _read_manifest(self) -> dict | None:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, ValueError) as err:  # written whole by a rename, so changed by hand
            raise UsageError(
                f"{self.path / MANIFEST} is not a scoring manifest ({err}); score into a new --output folder"
            ) from None

    def _write_manifest(self) -> None:
        with atomic_output(self.path / MANIFEST, "w") as f:
            json.dump(self._manifest, f, indent=2)
            f.write("\n")


def _check_same(manifest: dict, settings: dict, about: dict) -> None:
    differences = [
        f"{key} was {manifest['settings'].get(key)!r} and is now {settings.get(key)!r}"
        for key in sorted(set(manifest["settings"]) | set(settings))
        if manifest["settings"].get(key) != settings.get(key)
    ]
    if differences:
        if manifest["settings"].get("model_sha256") != settings.get("model_sha256"):
            differences.append(
                f"(the run's model: {manifest.get('about', {}).get('model')}; now: {about.get('model')})"
            )
        raise UsageError(
            "cannot resume a run with other settings: " + "; ".join(differences) + ". Use the run's settings, "
            "or give a new --output folder"
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

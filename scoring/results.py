"""One row per input, the same from either engine: built as an Arrow table, written as Parquet or CSV.

Parquet columns (``SCHEMA``): ``path`` (the input's name), ``path_bytes`` (the name's bytes on disk,
only when they are not UTF-8: ``path`` then shows U+FFFD for the bytes it cannot decode; null
otherwise), ``label`` and ``probability`` (the most likely class), ``top_k`` (a list of
``{label, probability}``, most likely first) and ``error`` (why the input has no prediction).
A row has either a prediction or an error; the other columns are null.

CSV columns: path, label, probability, top_k (``label:0.1234;...``), error. The CSV is UTF-8,
except that a name which is not valid UTF-8 is written as its bytes on disk
(``errors="surrogateescape"``), so every name round-trips exactly. A text cell starting with ``=``,
``+``, ``-``, ``@``, tab, carriage return or ``'`` is written with a leading ``'``, so that a
spreadsheet shows it as text instead of running it as a formula (OWASP, "CSV Injection"); reading
drops that one ``'`` again.

A row's id, which resume matches on, is the name's bytes.
"""

from __future__ import annotations

import csv
from typing import IO, Iterator, Sequence

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("path_bytes", pa.binary()),
        pa.field("label", pa.string()),
        pa.field("probability", pa.float32()),
        pa.field("top_k", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))),
        pa.field("error", pa.string()),
    ]
)
CSV_COLUMNS = ("path", "label", "probability", "top_k", "error")
QUOTED_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def name_bytes(name: str) -> bytes:
    """A name's bytes on disk: names are ``str`` decoded with surrogateescape, as ``os.fsdecode`` does."""
    return name.encode("utf-8", "surrogateescape")


def result_table(
    names: Sequence[str], errors: Sequence[str | None], probabilities: np.ndarray, class_names: Sequence[str], k: int
) -> pa.Table:
    """The rows of one batch: ``names[i]`` failed with ``errors[i]``, or, where that is None, has the
    next row of ``probabilities`` (one row per successful input, in order)."""
    ok = np.array([error is None for error in errors], dtype=bool)
    assert probabilities.shape[0] == ok.sum(), "one row of probabilities per successful input"
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    ranked = np.take_along_axis(probabilities, order, axis=1).astype(np.float32)
    labels = np.asarray(class_names, dtype=object)[order]
    best_label = np.full(len(names), None, dtype=object)
    best_label[ok] = labels[:, 0]
    best = np.zeros(len(names), np.float32)
    best[ok] = ranked[:, 0]
    offsets = np.concatenate([[0], np.cumsum(ok * k)]).astype(np.int32)
    pairs = pa.StructArray.from_arrays(
        [pa.array(labels.ravel(), pa.string()), pa.array(ranked.ravel(), pa.float32())], ["label", "probability"]
    )
    raw = [name_bytes(name) for name in names]
    columns = [
        pa.array([b.decode("utf-8", "replace") for b in raw], pa.string()),
        pa.array([None if _is_utf8(b) else b for b in raw], pa.binary()),
        pa.array(best_label, pa.string()),
        pa.array(best, pa.float32(), mask=~ok),
        pa.ListArray.from_arrays(pa.array(offsets), pairs, mask=pa.array(~ok)).cast(SCHEMA.field("top_k").type),
        pa.array(list(errors), pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def row_ids(table: pa.Table) -> list[bytes]:
    """Each row's id: its name's bytes (``path_bytes`` where set, else ``path`` in UTF-8)."""
    paths, raw = table.column("path").to_pylist(), table.column("path_bytes").to_pylist()
    return [b if b is not None else p.encode() for p, b in zip(paths, raw)]


def write_csv(table: pa.Table, f: IO[str]) -> None:
    """The rows as CSV with a header line; ``f`` is opened with ``newline=""`` and surrogateescape."""
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    names = [b.decode("utf-8", "surrogateescape") for b in row_ids(table)]
    columns = table.select(["label", "probability", "top_k", "error"]).to_pydict()
    for name, label, probability, ranked, error in zip(names, *columns.values()):
        if error is None:
            top = ";".join(f"{r['label']}:{r['probability']:.4f}" for r in ranked)
            row = (name, label, f"{probability:.6f}", top, "")
        else:
            row = (name, "", "", "", error)
        writer.writerow([_cell(text) for text in row])


def read_csv_ids(f: IO[str]) -> Iterator[tuple[bytes, bool]]:
    """(id, failed) for each row of a CSV part written by :func:`write_csv`."""
    reader = csv.reader(f)
    header = next(reader, None)
    if header != list(CSV_COLUMNS):
        raise ValueError(f"not a scoring CSV part: its header is {header}, expected {list(CSV_COLUMNS)}")
    for row in reader:
        yield name_bytes(row[0].removeprefix("'")), row[4] != ""


def _cell(text: str) -> str:
    """``text`` as a spreadsheet will show it, never run it: a leading ``'`` when it starts like a formula."""
    return f"'{text}" if text.startswith(QUOTED_STARTS) else text

"""One row per input, the same from either engine: built as an Arrow table, written as Parquet or CSV.

Parquet columns (``SCHEMA``): ``path`` (the input's name), ``path_bytes`` (the name's bytes on disk,
only when they are not UTF-8: ``path`` then shows U+FFFD for the bytes it cannot decode; null
otherwise), ``label`` and ``probability`` (the most likely class), ``top_k`` (a list of
``{label, probability}``, most likely first), ``unsure`` and ``unsure_reason`` (what /classify
answers for the image: ``out_of_distribution``, ``low_confidence`` or null; both null for a model
without calibration) and ``error`` (why the input has no prediction). A row has either a
prediction or an error; the other columns are null.

CSV columns: path, label, probability, top_k (``label:0.1234;...``), unsure (``true``, ``false``,
or empty for null), unsure_reason, error. The CSV is UTF-8, except that a name which is not valid
UTF-8 is written as its bytes on disk (``errors="surrogateescape"``), so every name round-trips
exactly. A text cell starting with ``=``, ``+``, ``-``, ``@``, tab, carriage return or ``'`` is
written with a leading ``'``, so that a spreadsheet shows it as text instead of running it as a
formula (OWASP, "CSV Injection"); reading drops that one ``'`` again.

A row's id, which resume matches on, is the name's bytes.
"""

from __future__ import annotations

import csv
from typing import IO, Iterator, Sequence

import numpy as np
import pyarrow as pa

from model_store.engine import rank
from model_store.errors import UsageError

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("path_bytes", pa.binary()),
        pa.field("label", pa.string()),
        pa.field("probability", pa.float32()),
        pa.field("top_k", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))),
        pa.field("unsure", pa.bool_()),
        pa.field("unsure_reason", pa.string()),
        pa.field("error", pa.string()),
    ]
)
CSV_COLUMNS = ("path", "label", "probability", "top_k", "unsure", "unsure_reason", "error")
CSV_BOOLS = {True: "true", False: "false", None: ""}
QUOTED_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def name_bytes(name: str) -> bytes:
    """A name's bytes on disk: names are ``str`` decoded with surrogateescape, as ``os.fsdecode`` does."""
    return name.encode("utf-8", "surrogateescape")


def result_table(
    names: Sequence[str],
    errors: Sequence[str | None],
    probabilities: np.ndarray,
    reasons: np.ndarray | None,
    class_names: Sequence[str],
    k: int,
) -> pa.Table:
    """The rows of one batch: ``names[i]`` failed with ``errors[i]``, or, where that is None, has the
    next row of ``probabilities`` and of ``reasons`` (one row per successful input, in order: each
    an ``unsure_reason`` or None, as ``model_store.engine.unsure_reasons`` gives them; ``reasons`` is
    None for a model without calibration)."""
    ok = np.array([error is None for error in errors], dtype=bool)
    assert probabilities.shape[0] == ok.sum(), "one row of probabilities per successful input"
    assert reasons is None or len(reasons) == ok.sum(), "one reason per successful input"
    order = rank(probabilities, k)  # as /classify ranks
    ranked = np.take_along_axis(probabilities, order, axis=1).astype(np.float32)
    labels = np.asarray(class_names, dtype=object)[order]
    best_label = np.full(len(names), None, dtype=object)
    best_label[ok] = labels[:, 0]
    best = np.zeros(len(names), np.float32)
    best[ok] = ranked[:, 0]
    unsure = np.zeros(len(names), bool)
    unsure_reason = np.full(len(names), None, dtype=object)
    if reasons is not None:
        unsure[ok] = reasons.astype(bool)  # a reason is a non-empty string, sure is None
        unsure_reason[ok] = reasons
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
        pa.array(unsure, pa.bool_(), mask=~ok if reasons is not None else np.ones(len(names), bool)),
        pa.array(unsure_reason, pa.string()),
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
    columns = table.select(["label", "probability", "top_k", "unsure", "unsure_reason", "error"]).to_pydict()
    for name, label, probability, ranked, unsure, reason, error in zip(names, *columns.values()):
        if error is None:
            top = ";".join(f"{r['label']}:{r['probability']:.4f}" for r in ranked)
            row = (name, label, f"{probability:.6f}", top, CSV_BOOLS[unsure], reason or "", "")
        else:
            row = (name, "", "", "", "", "", error)
        writer.writerow([_cell(text) for text in row])


def read_csv_ids(f: IO[str]) -> Iterator[tuple[bytes, bool]]:
    """(id, failed) for each row of a CSV part written by :func:`write_csv`."""
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise UsageError(f"not a scoring CSV part: it is empty, expected the header {list(CSV_COLUMNS)}")
    check_columns(header, CSV_COLUMNS)
    error = CSV_COLUMNS.index("error")
    for row in reader:
        yield name_bytes(row[0].removeprefix("'")), row[error] != ""


class OtherColumns(UsageError):
    """A part whose columns are not this scorer's: another version wrote it."""


def check_columns(got: Sequence[str], expected: Sequence[str]) -> None:
    """Refuse a part with other columns than this scorer writes, naming the difference: a run's
    parts must share their columns, or a reader of the folder would see some rows without them."""
    if list(got) == list(expected):
        return
    differences = []
    if missing := [c for c in expected if c not in got]:
        differences.append(f"it lacks the columns {', '.join(missing)}")
    if extra := [c for c in got if c not in expected]:
        differences.append(f"it has the columns {', '.join(extra)}, which this scorer does not write")
    if not differences:
        differences.append(f"its columns are {list(got)}, in another order than {list(expected)}")
    raise OtherColumns(f"was not written by this version of the scorer: {'; '.join(differences)}")


def _cell(text: str) -> str:
    """``text`` as a spreadsheet will show it, never run it: a leading ``'`` when it starts like a formula."""
    return f"'{text}" if text.startswith(QUOTED_STARTS) else text

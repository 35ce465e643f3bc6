"""The single-machine engine: a pool of worker processes, batched inference, parts written as they fill.

Decoding a small PNG is mostly Python (Pillow's header parsing, NumPy's conversion) holding the
GIL, so processes, not threads, put every core to work. A worker gets a batch of entries, reads and
decodes them and, on the CPU, scores them with its own one-thread ONNX Runtime session, returning
the probabilities, the energies and the errors (as Ray's fused replicas do: no pixels cross
processes, and no thread pool of this process fights the workers for the cores). With a GPU, this
process holds the one session and the workers only decode. This process lists, builds the rows
(the unsure answers too) and writes the parts.
At most two batches per worker are in flight, so the listing is read only as fast as scoring goes
and memory stays bounded.
"""

from __future__ import annotations

import copy
import functools
import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tqdm import tqdm

from model_store.engine import GPU_PROVIDER, OnnxClassifier, Outcomes, unsure_reasons
from scoring.decoding import exit_with_scorer, load_batch, score_batch
from scoring.parts import part_name, write_part
from scoring.results import result_table
from scoring.sources import Entry, Source

PART_SECONDS = 60.0  # a part is closed this long after its first row even when not full: a slow model loses a minute


class PartWriter:
    """Collects result tables and writes them as numbered parts of ``part_rows`` rows (the last
    one, and one closed after ``PART_SECONDS``, fewer)."""

    def __init__(self, folder: Path, run: int, fmt: str, part_rows: int):
        self.folder, self.run, self.fmt, self.part_rows = folder, run, fmt, part_rows
        self.written = 0  # parts written
        self._tables: list[pa.Table] = []
        self._rows, self._since = 0, time.monotonic()

    def add(self, table: pa.Table) -> None:
        if not self._tables:
            self._since = time.monotonic()
        self._tables.append(table)
        self._rows += len(table)
        while self._rows >= self.part_rows:
            rows = pa.concat_tables(self._tables)
            self._write(rows.slice(0, self.part_rows))
            rest = rows.slice(self.part_rows)
            self._tables, self._rows, self._since = [rest] if len(rest) else [], len(rest), time.monotonic()
        if self._tables and time.monotonic() - self._since >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._tables:
            self._write(pa.concat_tables(self._tables))
            self._tables, self._rows = [], 0

    def _write(self, rows: pa.Table) -> None:
        write_part(self.folder / part_name(self.run, self.written, self.fmt), rows, self.fmt)
        self.written += 1


def score(
    source: Source,
    entries: Iterator[Entry],
    classifier: OnnxClassifier,
    model: Path,
    writer: PartWriter,
    batch_size: int,
    k: int,
    workers: int,
    progress: tqdm,
) -> tuple[int, int]:
    """Score ``entries`` into ``writer``; returns (rows written, of which failed). ``workers`` worker
    processes (0: everything in this process, with ``classifier``)."""
    card = classifier.card
    pool = None
    if workers:
        # Forked from a server process that has imported the decoding path once, not from this one,
        # which already runs ONNX Runtime's threads (a fork would copy their locks mid-use).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["scoring.decoding"])
        pool = ProcessPoolExecutor(workers, context, initializer=exit_with_scorer, initargs=(os.getpid(),))
    replicas = pool is not None and classifier.provider != GPU_PROVIDER
    task = functools.partial(score_batch, model=str(model)) if replicas else load_batch
    in_flight: deque[tuple[list[str], Future]] = deque()
    rows = failed = 0
    try:
        for batch in _batches(entries, batch_size):
            in_flight.append(([entry.name for entry in batch], _submit(pool, task, source, batch, card)))
            while len(in_flight) > 2 * max(workers, 1):
                rows, failed = _finish(in_flight.popleft(), classifier, writer, k, progress, rows, failed)
        while in_flight:
            rows, failed = _finish(in_flight.popleft(), classifier, writer, k, progress, rows, failed)
        writer.flush()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows, failed


def _submit(pool: ProcessPoolExecutor | None, task, source: Source, batch: list[Entry], card) -> Future:
    if pool is not None:
        return pool.submit(task, source, batch, card)
    future: Future = Future()
    future.set_result(task(source, batch, card))
    return future


def _finish(
    item: tuple[list[str], Future], classifier: OnnxClassifier, writer: PartWriter, k: int, progress, rows, failed
) -> tuple[int, int]:
    names, future = item
    done, errors = future.result()  # inputs, or a worker's outcomes
    card = classifier.card
    if done is None:
        outcomes = Outcomes.empty(card.num_classes, classifier.has_ood)
    else:
        outcomes = done if isinstance(done, Outcomes) else classifier.outcomes(done)
    reasons = unsure_reasons(outcomes, card.calibration)
    writer.add(result_table(names, errors, outcomes.probabilities, reasons, card.class_names, k))
    progress.update(len(names))
    return rows + len(names), failed + sum(error is not None for error in errors)


def _batches(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    while batch := list(itertools.islice(entries, size)):
        yield batch


def count_in_background(source: Source, progress: tqdm) -> None:
    """Give the progress bar its total (and so its ETA) from a second listing, in a thread: the
    scoring listing is read only as fast as scoring goes, so it cannot tell the total early."""
    if progress.disable or not source.can_list_twice:
        return

    def count() -> None:
        total = sum(1 for _ in copy.copy(source).entries())
        progress.total = total
        progress.refresh()

    threading.Thread(target=count, name="count-inputs", daemon=True).start()

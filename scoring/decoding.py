"""Reading and decoding a batch of entries into model input, and on the CPU scoring it too: what a
worker process of the local engine, or a Ray task, runs."""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from model_store import ImageError, ModelCard, image_bytes_to_input
from model_store.engine import OnnxClassifier, Outcomes
from model_store.preprocess import keep_freed_memory
from scoring.sources import Entry, Source

logger = logging.getLogger(__name__)

_replicas: dict[str, OnnxClassifier] = {}  # this process's one-thread session of each model file
_keep_freed_memory = functools.cache(keep_freed_memory)  # once per process, which decodes batch after batch


def load_inputs(source: Source, entries: list[Entry], card: ModelCard) -> list[np.ndarray | str]:
    """Each entry's model input, or the reason it cannot be used; the store's reads overlap."""
    _keep_freed_memory()
    if source.read_threads > 1 and len(entries) > 1:
        with ThreadPoolExecutor(min(source.read_threads, len(entries))) as pool:
            return list(pool.map(lambda entry: _load(source, entry, card), entries))
    return [_load(source, entry, card) for entry in entries]


def _load(source: Source, entry: Entry, card: ModelCard) -> np.ndarray | str:
    if entry.problem:
        return entry.problem
    try:
        return image_bytes_to_input(source.read(entry.location), card)
    except (ImageError, OSError) as err:
        return str(err)
    except Exception as err:  # a decoder bug on one crafted file costs that file's row, not the run
        logger.warning("unexpected error decoding %s", entry.name, exc_info=True)
        kind = f"{type(err).__module__}.{type(err).__qualname__}".removeprefix("builtins.")
        return f"{kind}: {err}"


def load_batch(source: Source, entries: list[Entry], card: ModelCard) -> tuple[np.ndarray | None, list[str | None]]:
    """A batch's inputs stacked ([N, C, H, W] uint8, None when none could be used) and each entry's
    error (None where it has an input). Runs in a decoding process or a Ray task."""
    loaded = load_inputs(source, entries, card)
    good = [x for x in loaded if not isinstance(x, str)]
    return (np.stack(good) if good else None), [x if isinstance(x, str) else None for x in loaded]


def score_batch(source: Source, entries: list[Entry], card: ModelCard, model: str) -> tuple[Outcomes | None, list]:
    """:func:`load_batch`, then the batch's outcomes (without the features, which the scorer does
    not write and the pipe need not carry) from this process's own
    one-thread ONNX Runtime session of ``model`` (instead of the inputs): a worker per core, each
    running its own batches start to end, keeps every core busy without two thread pools fighting
    over them."""
    inputs, errors = load_batch(source, entries, card)
    if inputs is None:
        return None, errors
    if model not in _replicas:
        _replicas[model] = OnnxClassifier(model, "cpu", threads=1)
    return _replicas[model].outcomes(inputs)._replace(features=None), errors


def exit_with_scorer(scorer: int) -> None:
    """End this worker once the scorer process has exited. A SIGKILLed scorer cannot stop its pool;
    its workers would wait forever on a queue whose writing end they hold themselves, and keep the
    fork server they came from alive (it waits for every holder of the scorer's pipe)."""
    try:  # Linux: readable once the scorer has exited, even before its parent reaps it
        exited = os.pidfd_open(scorer)
    except (AttributeError, OSError):
        exited = None

    def watch() -> None:
        if exited is not None:
            select.select([exited], [], [])
        else:
            while _running(scorer):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-scorer", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks the PID, delivers nothing
    except ProcessLookupError:
        return False
    return True

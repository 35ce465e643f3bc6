"""The Ray Data engine: the local engine's inputs, rows, part files and resume, across a cluster.

    listing (this process) -> read + decode (CPU tasks, ``model_store`` preprocessing)
        -> ONNX Runtime (an actor pool of model replicas, one GPU each when the cluster has GPUs)
        -> part files (write tasks)

Needs the ``[scale]`` extra. It connects to the cluster at ``--ray-address`` (or ``$RAY_ADDRESS``),
else starts a local Ray instance. Every node must see the source (an object store, or a shared
mount at the same path) and the output folder (a shared mount); the model travels to the actors as
bytes, so it need not be on the nodes.

On a cluster with GPUs, decoding runs in CPU tasks and the replicas hold a GPU each (one replica
per GPU by default). Without GPUs, Ray fuses the two stages (they ask for the same resources, one
CPU), so each replica decodes its own batches and no pixels cross processes; the default is then
one replica, with a one-thread ONNX Runtime session, per CPU of the cluster.

The listing is streamed here, filtered by what the finished parts hold, and handed to Ray in blocks
of ``BLOCK_BATCHES`` batches through the object store (about 100 bytes an entry). Parts are
written by a :class:`Datasink` with the local engine's writer rather than by ``write_parquet``:
Ray's Parquet writer writes each file in place, so a killed worker could leave a truncated file in
the output, and resume reads the parts themselves instead of a second copy of the ids in Ray's
``CheckpointConfig``. A part is named by its run and its write task, so a retried task rewrites
the same file.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from model_store import ModelCard
from model_store.engine import GPU_PROVIDER, OnnxClassifier, Outcomes, unsure_reasons
from model_store.errors import UsageError
from scoring.decoding import load_batch
from scoring.parts import part_name, write_part
from scoring.results import SCHEMA, name_bytes, result_table
from scoring.sources import Entry, Source

logger = logging.getLogger(__name__)

BLOCK_BATCHES = 4  # batches per listing block: a block is one task, so blocks are kept small enough to spread


def score(
    source: Source,
    entries: Iterator[Entry],
    model_path: Path,
    card: ModelCard,
    folder: Path,
    run: int,
    fmt: str,
    *,
    batch_size: int,
    top_k: int,
    part_rows: int,
    address: str | None,
    concurrency: int | None,
    device: str,
) -> str:
    """Score ``entries`` into part files of run ``run`` in ``folder``; returns the replicas' provider."""
    if not ray.is_initialized():
        ray.init(address=address)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device != "cpu" and gpus > 0 and GPU_PROVIDER in ort.get_available_providers()
    if device == "cuda" and not use_gpu:
        raise UsageError(f"--device cuda: the cluster has {gpus:g} GPUs and this onnxruntime build no CUDA provider")
    replicas = concurrency or int(gpus if use_gpu else max(1, ray.cluster_resources().get("CPU", 1)))
    blocks = [ray.put(_listing_table(block)) for block in _blocks(entries, BLOCK_BATCHES * batch_size)]
    if blocks:
        logger.info(
            "scoring %d listing blocks with %d replicas on %s", len(blocks), replicas, "GPU" if use_gpu else "CPU"
        )
        (
            ray.data.from_arrow_refs(blocks)
            .map_batches(
                _decode,
                fn_kwargs={"source": source, "card": card},
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=1,
            )
            .map_batches(
                _Classify,
                fn_constructor_kwargs={
                    "model": model_path.read_bytes(),
                    "top_k": top_k,
                    "device": "cuda" if use_gpu else "cpu",
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=replicas),
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
            )
            # no CPU reserved for writing a part: the replicas may hold every CPU, and parts must
            # still be written as they fill, not once the replicas are done
            .write_datasink(_PartsDatasink(str(folder), run, fmt, part_rows), ray_remote_args={"num_cpus": 0})
        )
    return GPU_PROVIDER if use_gpu else "CPUExecutionProvider"


def _blocks(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    while block := list(itertools.islice(entries, size)):
        yield block


def _listing_table(entries: list[Entry]) -> pa.Table:
    # names and locations as bytes: a name that is not UTF-8 cannot be an Arrow string
    return pa.table(
        {
            "name": pa.array([name_bytes(e.name) for e in entries], pa.binary()),
            "location": pa.array([name_bytes(e.location) for e in entries], pa.binary()),
            "problem": pa.array([e.problem for e in entries], pa.string()),
        }
    )


def _decode(batch: dict[str, np.ndarray], source: Source, card: ModelCard) -> dict[str, np.ndarray]:
    """Read and decode a batch: every row keeps its name, with pixels (zeros where it failed) and an error ("" if none)."""
    entries = [
        Entry(_text(name), _text(location), problem)
        for name, location, problem in zip(batch["name"], batch["location"], batch["problem"])
    ]
    pixels, errors = load_batch(source, entries, card)
    full = np.zeros((len(entries), card.in_channels, card.height, card.width), np.uint8)
    ok = np.array([error is None for error in errors], dtype=bool)
    if pixels is not None:
        full[ok] = pixels
    return {"name": batch["name"], "pixels": full, "error": np.array([e or "" for e in errors], dtype=object)}


def _text(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


class _Classify:
    """A model replica: one ONNX Runtime session, a batch of decoded rows in, result rows out."""

    def __init__(self, model: bytes, top_k: int, device: str):
        # one thread on the CPU: a replica holds one CPU of Ray's accounting
        self.classifier = OnnxClassifier(model, device, threads=0 if device == "cuda" else 1)
        if self.classifier.provider_error:
            raise RuntimeError(self.classifier.provider_error)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [error or None for error in batch["error"]]
        ok = np.array([error is None for error in errors], dtype=bool)
        card = self.classifier.card
        if ok.any():
            outcomes = self.classifier.outcomes(np.ascontiguousarray(batch["pixels"][ok]))
        else:
            outcomes = Outcomes.empty(card.num_classes, self.classifier.has_ood)
        reasons = unsure_reasons(outcomes, card.calibration)
        names = [_text(name) for name in batch["name"]]
        return result_table(names, errors, outcomes.probabilities, reasons, card.class_names, self.top_k)


class _PartsDatasink(Datasink):
    """Each write task writes its rows as one part file, atomically, named by the run and the task."""

    def __init__(self, folder: str, run: int, fmt: str, part_rows: int):
        self.folder, self.run, self.fmt, self.part_rows = folder, run, fmt, part_rows

    @property
    def min_rows_per_write(self) -> int:
        return self.part_rows

    def write(self, blocks: Iterable, ctx) -> int:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table.cast(SCHEMA) for table in tables if len(table)]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        write_part(Path(self.folder) / part_name(self.run, ctx.task_idx, self.fmt), table, self.fmt)
        return len(table)

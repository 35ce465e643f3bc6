"""The GPU suite's serving step: the real service started on one graph, loaded closed-loop, and the
in-process limit it is measured against (benchmarks.gpu.suite, step 7).

Torch-free, like the service: what it runs is ``bentoml serve`` of serving/service.py with the
graph registered in a BentoML home of its own, and ``model_store.engine.OnnxClassifier``, the engine
the service itself runs, for the limit. The load client is wrk where it is installed, else
benchmarks.closed_loop (the GPU machines have no wrk); the row says which.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from benchmarks.load import Bodies, run_closed_loop, run_wrk, write_bodies
from benchmarks.servers import REPO, answers, free_port, metric_sums, start, stop

SERVING_BATCH = 64  # SERVING_MAX_BATCH_SIZE's default: the in-process limit runs the same batches
READY_S = 120  # a CUDA session's first start (cuDNN, arenas) can take a while
__all__ = ["encode_pngs", "in_process_limit", "load", "register", "service", "write_bodies"]


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """uint8 images [N, H, W] as PNG files (~0.7 KB for Fashion-MNIST), as a client would send them."""
    from PIL import Image

    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def in_process_limit(graph: Path, device: str, pngs: list[bytes], seconds: float) -> dict:
    """Images/s of the service's own engine in this process at the service's batch size: from PNG
    bytes (decode and resize included, one thread) and from ready inputs (the model alone)."""
    from model_store import image_bytes_to_input
    from model_store.engine import OnnxClassifier

    classifier = OnnxClassifier(graph, device)
    batch = pngs[:SERVING_BATCH]

    def decode() -> np.ndarray:
        return np.stack([image_bytes_to_input(png, classifier.card) for png in batch])

    inputs = decode()
    classifier.warm_up([len(batch)])
    return {
        "provider": classifier.provider,
        "batch": len(batch),
        "decode_img_s": images_per_s(lambda: classifier.predict(decode()), len(batch), seconds),
        "model_img_s": images_per_s(lambda: classifier.predict(inputs), len(batch), seconds),
    }


def images_per_s(call: Callable[[], object], batch: int, seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def register(graph: Path, home: Path, name: str, site: Path | None = None) -> Path:
    """``python -m model_store register`` into a BentoML home of the step's own; returns the home."""
    env = {**with_site(site), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    command = [sys.executable, "-m", "model_store", "register", str(graph), "--name", name]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"model_store register failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return home


@contextlib.contextmanager
def service(
    home: Path, name: str, device: str, workers: int, logs: Path, deadline: float, site: Path | None = None
) -> Iterator[tuple[str, int]]:
    """``bentoml serve`` of serving/service.py on a free port; yields (base URL, pid) once /readyz
    answers, and stops its whole process group afterwards. ``site``: packages for it alone."""
    port = free_port()
    env = {
        **with_site(site),
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "SERVING_MODELS": f"{name}:latest",
        "SERVING_DEVICE": device,
        "SERVING_WORKERS": str(workers),
        "SERVING_BATCH_WAIT_MS": "2" if device == "cuda" else "0",  # a GPU batch is worth a short wait
    }
    if device == "cuda":  # the service is torch-free: nothing else loads the nvidia packages' CUDA libraries
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*cuda_library_dirs(), env.get("LD_LIBRARY_PATH")]))
    log = logs / f"service-{workers}w.log"
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    child = start(command, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        ready_by = min(deadline, time.monotonic() + READY_S)
        while not answers(base + "/readyz", timeout=2):
            if child.poll() is not None:
                raise RuntimeError(f"the service exited with {child.returncode}: {last_line(log)}")
            if time.monotonic() > ready_by:
                raise TimeoutError(f"the service was not ready in time: {last_line(log)}")
            time.sleep(0.5)
        yield base, child.pid
    finally:
        stop(child, wait_s=20)


def with_site(site: Path | None) -> dict[str, str]:
    """This process's environment with ``site`` added to PYTHONPATH: the service's packages reach the
    service alone, never the training and export subprocesses (a newer typing-extensions among them)."""
    path = [os.environ.get("PYTHONPATH"), str(site) if site else None]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def load(base: str, bodies: Bodies, concurrency: int, seconds: float, pid: int, client: str = "auto") -> dict:
    """One closed-loop run on /classify (``benchmarks.load.run_wrk``'s figures, ``client`` and the mean
    batch the service ran, from its /metrics)."""
    before = metric_sums(base, "classify_batch_size")
    if client == "wrk" or (client == "auto" and shutil.which("wrk")):
        figures = {**run_wrk(base + "/classify", bodies, concurrency, seconds, pid), "client": "wrk"}
    else:
        figures = run_closed_loop(base + "/classify", bodies, concurrency, seconds, pid)
    after = metric_sums(base, "classify_batch_size")
    batches = after[0] - before[0]
    return {**figures, "mean_batch": (after[1] - before[1]) / batches if batches else float("nan")}


def cuda_library_dirs() -> list[str]:
    """The lib folders of the nvidia-* packages (cuDNN, cuBLAS, the CUDA runtime) on this Python's path."""
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    return sorted({str(p.parent) for root in roots for p in Path(root).glob("**/lib/*.so*")})


def last_line(log: Path) -> str:
    return (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]

"""Shared fixtures: the real Fashion-MNIST files, a briefly trained checkpoint, its ONNX export,
and a real `bentoml serve` of the service on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.servers import answers, free_port, start, stop

REPO = Path(__file__).resolve().parents[1]
# Training's input cache (training/tensors.py): one per test session, so no run depends on another's.
os.environ.setdefault("CLASSIC_CNNS_CACHE", tempfile.mkdtemp(prefix="classic-cnns-cache-"))


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The real 10,000 test images and labels. Missing data fails under CI and skips only on a dev box."""
    from training.fashion_mnist_files import load_fashion_mnist

    try:
        return load_fashion_mnist("test")
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real Fashion-MNIST: {err}")
        pytest.skip(f"real Fashion-MNIST not available: {err}")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, fashion_test) -> Path:
    """lenet_bn trained for one epoch on 3,000 real images: quick, and already far above chance."""
    from training.__main__ import get_args_parser
    from training.train import main

    out = tmp_path_factory.mktemp("run")
    args = get_args_parser().parse_args(
        [
            "train",
            "--model",
            "lenet_bn",
            "--model-arg",
            "activation=relu",
            "--model-arg",
            "pool=max",
            "--epochs",
            "2",
            "--train-limit",
            "3000",
            "--test-limit",
            "1000",
            "--output-dir",
            str(out),
        ]
    )
    main(args)
    return out / "last.pt"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint) -> Path:
    from export.__main__ import get_args_parser, main

    path = tmp_path_factory.mktemp("export") / "lenet_bn.onnx"
    main(get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(path)]))
    return path


@pytest.fixture(scope="session")
def uncalibrated(tmp_path_factory) -> Path:
    """The shipped graph with its card's calibration taken out: a model as every export made before
    export calibrated (and as a run with --no-hold-out exports), which cannot say when it is unsure."""
    import dataclasses

    import onnx

    from export.onnx_export import with_card
    from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card

    card = read_onnx_card(DEFAULT_MODEL_FILE)
    metrics = {k: v for k, v in card.metrics.items() if k != "calibration"}
    plain = dataclasses.replace(card, calibration=None, metrics=metrics)
    path = tmp_path_factory.mktemp("uncalibrated") / "lenet-uncalibrated.onnx"
    onnx.save(with_card(onnx.load(DEFAULT_MODEL_FILE), plain), path)
    return path


def wait_until(condition, what, timeout_s: float = 60, every_s: float = 0.05):
    """Poll ``condition()`` until it returns something true, and return that; fail naming ``what``
    (a string, or a function that makes one) if it has not within ``timeout_s``. The deadline is a
    bound for a hung test, never a pace: it is generous, and the wait ends once the condition holds."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what() if callable(what) else what}")
        time.sleep(every_s)
    return result


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    """A private BentoML home with the shipped models registered through the CLI."""
    home = tmp_path_factory.mktemp("bentoml")
    result = run_cli("-m", "model_store", "register-default", env={"BENTOML_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def served_models(bentoml_home, exported) -> str:
    """SERVING_MODELS for the test server: the shipped default first, then the test's own export."""
    result = run_cli(
        "-m", "model_store", "register", str(exported), "--name", "test-lenet", env={"BENTOML_HOME": str(bentoml_home)}
    )
    assert result.returncode == 0, result.stderr
    return "fashion-lenet:latest,test-lenet:latest"


@contextlib.contextmanager
def bentoml_serve(bentoml_home: Path, log: Path, env: dict[str, str]):
    """`bentoml serve` from the repo root, as the README runs it, once /readyz is green; yields its URL.

    Each server gets its own copy of the BentoML home: `bentoml serve` empties
    $BENTOML_HOME/prometheus_multiproc_dir at start, which would wipe the metrics of a server
    already running from the same home.
    """
    port = free_port()
    home = log.parent / "bentoml"
    shutil.copytree(bentoml_home / "models", home / "models")
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = start(command, {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", **env}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url, process, log), lambda: f"{url} ready:\n{log.read_text()[-4000:]}", 180, 0.2)
        yield url
    finally:
        if process.poll() is None:  # else it ended on its own, and the failure above says why
            stop(process)


def ready(url: str, process: subprocess.Popen | None = None, log: Path | None = None) -> bool:
    """Whether the server at ``url`` answers /readyz with 200; fails at once if its process has exited."""
    if process is not None and process.poll() is not None:
        pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-4000:] if log else ''}")
    return answers(f"{url}/readyz")


@pytest.fixture(scope="session")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="session")
def server(bentoml_home, served_models, server_log) -> str:
    """The service with default settings, serving two models."""
    with bentoml_serve(bentoml_home, server_log, {"SERVING_MODELS": served_models}) as url:
        yield url

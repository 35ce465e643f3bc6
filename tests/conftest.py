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

# The two tiers. `make check` runs the tests marked neither heavy nor processes (`-m "not heavy"`):
# no training run, no export, no real server or other process, no container, no browser; under two
# minutes on 2 cores, for every change. `make test` runs every test. A test's tier is decided here,
# from what it asks for, never marked by hand: a new test that trains, serves, builds an image or
# opens a browser asks for a fixture below, and lands in the heavy tier without a thought.
HEAVY_FIXTURES = {
    "checkpoint": "trains a model",
    "exported": "trains and exports a model",
    "bentoml_home": "starts a real `bentoml serve` (every server is made from this store)",
    "engine": "builds and runs container images",
    "browser": "drives Chromium",
    "ray_local": "starts a Ray instance",
    "energy_only": "fits an OOD head and drift reference on held-out images, an export step (test_drift)",
}
# Modules whose every test builds, trains or exports networks in PyTorch (the model zoo, training
# and export themselves), or runs their command-line tools, each a process that imports torch.
HEAVY_MODULES = {
    "test_models": "builds and trains every registered network",
    "test_export_models": "exports every registered network",
    "test_training": "trains",
    "test_training_recipes": "trains",
    "test_cam": "trains and exports networks with a class-activation map",
    "test_gpu_suite": "runs the GPU suite's smoke run",
    "test_console_scripts": "starts each command-line tool",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        reasons = [why for name, why in HEAVY_FIXTURES.items() if name in item.fixturenames]
        if module := HEAVY_MODULES.get(item.module.__name__.rsplit(".", 1)[-1]):
            reasons.append(module)
        if item.get_closest_marker("processes"):  # it starts, kills or times other processes
            reasons.append("starts other processes")
        if reasons:
            item.add_marker(pytest.mark.heavy(*reasons))


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
    """The checkpoint exported as `python -m export` exports it (its entry point, in this process);
    what it printed is kept beside the graph, in export.log, for the tests of that output."""
    from export.__main__ import cli

    path = tmp_path_factory.mktemp("export") / "lenet_bn.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(["--checkpoint", str(checkpoint), "--output", str(path)])
    (path.parent / "export.log").write_text(printed.getvalue())
    assert code == 0, printed.getvalue()
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
    # gRPC (serving.grpc_server) on a port of its own in every test server: 8001 would be shared
    grpc = {"SERVING_GRPC_PORT": str(free_port())}
    process = start(command, {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", **grpc, **env}, log)
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
def server_grpc_port() -> int:
    """The gRPC port of :func:`server`."""
    return free_port()


@pytest.fixture(scope="session")
def server(bentoml_home, served_models, server_log, server_grpc_port) -> str:
    """The service with default settings, serving two models."""
    env = {"SERVING_MODELS": served_models, "SERVING_GRPC_PORT": str(server_grpc_port)}
    with bentoml_serve(bentoml_home, server_log, env) as url:
        yield url


# Headless Chromium for /ui (tests/test_ui_browser.py, test_foreign.py): Debian's chromium and chromedriver
# (`make browser`), by their paths, so Selenium never looks for a driver on the network. Missing, they fail
# the test under CI and skip it only on a dev box. Session scope, and first in each test's arguments: a box
# without a browser skips before the server starts.
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (the test extra)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have a browser to test /ui: missing {', '.join(missing)}")
        pytest.skip(f"no browser to test /ui: missing {', '.join(missing)} (make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations among them
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()

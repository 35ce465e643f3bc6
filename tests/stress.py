"""Run the suite where a test bound to this machine would fail: at other speeds, and with other kernels.

    python tests/stress.py                  # every mode, the clock modes' process tests 3 more times
    python tests/stress.py --modes pinned --repeat 5 -- -k scoring   # one mode; pytest arguments after --
    python tests/stress.py --modes blas,ort-threads-1                 # "blas": each BLAS kernel this CPU runs
    python tests/stress.py --modes blas-Sandybridge                   # one of them

A test that waits for a fixed time, or asserts that something happens within one, passes on the
machine it was written on and fails on a faster, slower or busier one. The clock modes change the
speed the tests see, each in its own way:

- ``pinned``: the suite and every process it starts share one core (``sched_setaffinity``, as
  ``taskset -c``), so a server, its decoders and the client take turns;
- ``hogged``: all cores, with as many busy-looping processes beside the suite as it has cores;
- ``normal``: the machine as it is.

A test that compares floats bit for bit passes on the CPU it was written on and fails on one whose
kernels round differently (tests/tolerance.py). The kernel modes run the suite as another CPU would:

- ``blas-NAME``: numpy's OpenBLAS forced to the kernel NAME (``OPENBLAS_CORETYPE``), for each of
  Haswell, SkylakeX, Zen, Prescott and Sandybridge that this CPU can run and that differs from the
  kernel it picks itself (a kernel for instructions the CPU lacks dies of SIGILL: skipped, and said);
- ``ort-threads-1``, ``ort-threads-2``: every ONNX Runtime session that does not set its intra-op
  threads gets 1 or 2 (tests/ort_threads/sitecustomize.py), in the tests and the servers they start;
- ``torch-baseline-isa``: PyTorch's own kernels and oneDNN's limited to baseline x86-64 code
  (``ATEN_CPU_CAPABILITY=default``, ``ONEDNN_MAX_CPU_ISA=SSE41``), as on a CPU without AVX.

In a clock mode the whole suite runs once, then the tests marked ``processes`` (they start, kill or
time processes: servers, scorers, decoders) ``--repeat`` more times; a kernel mode runs the suite
once. Every run writes its JUnit XML and its output to ``--out``; the table at the end says, per
mode, how many runs passed and which tests failed. Exit status 1 if any run failed. A tool for
people, not part of ``make test``: on 2 cores the modes take several hours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
CLOCK_MODES = ("pinned", "hogged", "normal")
BLAS_KERNELS = ("Haswell", "SkylakeX", "Zen", "Prescott", "Sandybridge")
ORT_THREADS = {"ort-threads-1": 1, "ort-threads-2": 2}
TORCH_BASELINE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
# Each mode's probe, run under its settings before the suite: it prints what the mode claims to
# change, so that a mode the installed libraries ignore is refused rather than passed.
BLAS_PROBE = (
    "import numpy as np, threadpoolctl; a = np.random.default_rng(0).standard_normal((64, 64)); "
    "np.linalg.eigvalsh(a @ a.T); print(threadpoolctl.threadpool_info()[0]['architecture'])"
)
ORT_PROBE = (
    "import onnxruntime as ort; from model_store.store import DEFAULT_MODEL_FILE; "
    "s = ort.InferenceSession(str(DEFAULT_MODEL_FILE), providers=['CPUExecutionProvider']); "
    "print(s.get_session_options().intra_op_num_threads)"
)
TORCH_PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"


@dataclass
class Mode:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    clock: bool = False  # a clock mode: the process tests run --repeat more times


@dataclass
class Run:
    mode: str
    what: str  # "suite", or "processes #N"
    seconds: float
    tests: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    exit_code: int = 0

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.failed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    names = [*CLOCK_MODES, "blas", *ORT_THREADS, "torch-baseline-isa"]
    parser.add_argument(
        "--modes", default=",".join(names), help=f"comma-separated, of {', '.join(names)} (default: all)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="extra runs of the 'processes' tests in each clock mode (default: 3)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "build" / "stress", help="logs (default: build/stress)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest run")
    return parser


def probe(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
    )


def blas_modes() -> list[Mode]:
    """A mode per OpenBLAS kernel this CPU runs, other than the one it picks itself."""
    own = probe(BLAS_PROBE, {}).stdout.strip()
    seen, modes = {own}, []
    for kernel in BLAS_KERNELS:
        result = probe(BLAS_PROBE, {"OPENBLAS_CORETYPE": kernel})
        runs = result.stdout.strip()
        if result.returncode != 0:
            print(f"blas-{kernel}: skipped, this CPU cannot run it (exit {result.returncode})", flush=True)
        elif runs in seen:
            print(f"blas-{kernel}: skipped, it runs the {runs} kernel, already covered", flush=True)
        else:
            seen.add(runs)
            modes.append(Mode(f"blas-{kernel}", {"OPENBLAS_CORETYPE": kernel}))
    print(f"OpenBLAS picks {own} here; the blas modes run {', '.join(sorted(seen - {own})) or 'none'}", flush=True)
    return modes


def resolve(names: list[str]) -> list[Mode]:
    modes = []
    for name in names:
        if name in CLOCK_MODES:
            modes.append(Mode(name, clock=True))
        elif name == "blas":
            modes += blas_modes()
        elif name.startswith("blas-"):  # one of them, as the blas mode names it (e.g. blas-Sandybridge)
            found = [mode for mode in blas_modes() if mode.name == name]
            if not found:
                raise SystemExit(f"error: {name} is not a blas mode this CPU runs (said above)")
            modes += found
        elif name in ORT_THREADS:
            hook = str(REPO / "tests" / "ort_threads")
            pythonpath = os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")]))
            env = {"STRESS_ORT_THREADS": str(ORT_THREADS[name]), "PYTHONPATH": pythonpath}
            modes.append(Mode(name, {**env, "SERVING_ORT_THREADS": str(ORT_THREADS[name])}))
        elif name == "torch-baseline-isa":
            modes.append(Mode(name, TORCH_BASELINE))
        else:
            raise SystemExit(f"error: unknown mode {name!r}; the modes are {get_args_parser().get_default('modes')}")
    return modes


def check(mode: Mode) -> None:
    """Stop if ``mode``'s settings do not take: its runs would only repeat the normal mode."""
    if mode.name in ORT_THREADS:
        code, want = ORT_PROBE, mode.env["STRESS_ORT_THREADS"]
    elif mode.name == "torch-baseline-isa":
        code, want = TORCH_PROBE, "DEFAULT"
    else:
        return
    result = probe(code, mode.env)
    if result.stdout.strip() != want:
        raise SystemExit(f"error: {mode.name} does not take: expected {want}, got {result.stdout or result.stderr}")


@contextlib.contextmanager
def hog(cores: int) -> Iterator[None]:
    """``cores`` processes that spin at full speed until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def pytest_run(mode: Mode, what: str, argv: list[str], out: Path, cpus: set[int]) -> Run:
    name = f"{mode.name}-{what.replace(' #', '-')}"
    junit, log = out / f"{name}.xml", out / f"{name}.log"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *argv]
    pin = (lambda: os.sched_setaffinity(0, {min(cpus)})) if mode.name == "pinned" else None
    started = time.monotonic()
    with open(log, "w") as output:
        code = subprocess.run(
            command, cwd=REPO, env={**os.environ, **mode.env}, stdout=output, stderr=subprocess.STDOUT, preexec_fn=pin
        ).returncode
    run = Run(mode.name, what, time.monotonic() - started, exit_code=code)
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            run.tests += 1
            if case.find("failure") is not None or case.find("error") is not None:
                run.failed.append(f"{case.get('classname')}::{case.get('name')}")
            elif case.find("skipped") is not None:
                run.skipped += 1
    print(
        f"{mode.name:18} {what:13} {run.seconds:7.0f} s  {run.tests} tests, {len(run.failed)} failed, exit {code}",
        flush=True,
    )
    return run


def main(args: argparse.Namespace) -> int:
    modes = resolve(args.modes.split(","))
    cpus = os.sched_getaffinity(0)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for mode in modes:
        check(mode)
        with hog(len(cpus)) if mode.name == "hogged" else contextlib.nullcontext():
            runs.append(pytest_run(mode, "suite", args.pytest_args, args.out, cpus))
            for i in range(1, args.repeat + 1 if mode.clock else 1):
                argv = ["-m", "processes", *args.pytest_args]
                runs.append(pytest_run(mode, f"processes #{i}", argv, args.out, cpus))
    print(f"\n{len(cpus)} cores; logs in {args.out}\n")
    print("| mode | run | tests | failed | skipped | minutes |\n|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.mode} | {run.what} | {run.tests} | {len(run.failed)} | {run.skipped} | {run.seconds / 60:.1f} |")
    for run in runs:
        for test in run.failed:
            print(f"FAILED in {run.mode} {run.what}: {test}")
        if run.exit_code and not run.failed:
            print(f"pytest exited {run.exit_code} in {run.mode} {run.what}: see its log")
    return 0 if all(run.passed for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

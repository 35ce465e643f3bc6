"""Run the suite where a clock-bound test would fail: pinned to one core, beside a CPU hog, and as is.

    python tests/stress.py                  # all three modes, then the process tests 3 more times in each
    python tests/stress.py --modes pinned --repeat 5 -- -k scoring   # one mode; pytest arguments after --

A test that waits for a fixed time, or asserts that something happens within one, passes on the
machine it was written on and fails on a faster, slower or busier one. Each mode changes the speed
the tests see, in its own way:

- ``pinned``: the suite and every process it starts share one core (``sched_setaffinity``, as
  ``taskset -c``), so a server, its decoders and the client take turns;
- ``hogged``: all cores, with as many busy-looping processes beside the suite as it has cores;
- ``normal``: the machine as it is.

In each mode the whole suite runs once, then the tests marked ``processes`` (they start, kill or
time processes: servers, scorers, decoders) ``--repeat`` more times. Every run writes its JUnit XML
and its output to ``--out``; the table at the end says, per mode, how many runs passed and which
tests failed. Exit status 1 if any run failed. A tool for people, not part of ``make test``: on 2
cores the three modes take well over an hour.
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
MODES = ("pinned", "hogged", "normal")


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
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default: all)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="extra runs of the 'processes' tests in each mode (default: 3)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "build" / "stress", help="logs (default: build/stress)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest run")
    return parser


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


def pytest_run(mode: str, what: str, argv: list[str], out: Path, cpus: set[int]) -> Run:
    name = f"{mode}-{what.replace(' #', '-')}"
    junit, log = out / f"{name}.xml", out / f"{name}.log"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *argv]
    pin = (lambda: os.sched_setaffinity(0, {min(cpus)})) if mode == "pinned" else None
    started = time.monotonic()
    with open(log, "w") as output:
        code = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, preexec_fn=pin).returncode
    run = Run(mode, what, time.monotonic() - started, exit_code=code)
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            run.tests += 1
            if case.find("failure") is not None or case.find("error") is not None:
                run.failed.append(f"{case.get('classname')}::{case.get('name')}")
            elif case.find("skipped") is not None:
                run.skipped += 1
    print(
        f"{mode:7} {what:13} {run.seconds:7.0f} s  {run.tests} tests, {len(run.failed)} failed, exit {code}", flush=True
    )
    return run


def main(args: argparse.Namespace) -> int:
    modes = args.modes.split(",")
    if unknown := [mode for mode in modes if mode not in MODES]:
        print(f"error: unknown mode {unknown[0]!r}; the modes are {', '.join(MODES)}", file=sys.stderr)
        return 2
    cpus = os.sched_getaffinity(0)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for mode in modes:
        with hog(len(cpus)) if mode == "hogged" else contextlib.nullcontext():
            runs.append(pytest_run(mode, "suite", args.pytest_args, args.out, cpus))
            for i in range(1, args.repeat + 1):
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

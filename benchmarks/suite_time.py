"""How long the test suite takes: `make check`'s tier, then the whole suite, as `make test` runs it.

    python -m benchmarks.suite_time --write BENCHMARKS.md
    python -m benchmarks.suite_time --tiers check          # the fast tier alone

Each tier runs as the Makefile runs it (ruff, then pytest), timed from outside; pytest's JUnit XML
gives each test's time, and with it the slowest files. Run it on a quiet machine: the figure is the
machine's as much as the suite's, so say which machine, and compare runs of one machine only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from benchmarks.report import device, write_section
from benchmarks.servers import REPO

SECTION = "## Test suite time"
TIERS = {"check": ["-m", "not heavy"], "test": []}  # pytest arguments of `make check` and `make test`


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", nargs="+", default=list(TIERS), choices=list(TIERS), help="default: both")
    parser.add_argument("--write", type=Path, default=None, help="write the figures into this BENCHMARKS.md")
    return parser


def run_tier(name: str, junit: Path) -> dict:
    started = time.monotonic()
    for lint in (["check", "."], ["format", "--check", "."]):
        subprocess.run([sys.executable, "-m", "ruff", *lint], cwd=REPO, check=True, capture_output=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TIERS[name]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    files = Counter()
    for case in cases:
        files[case.get("classname").rsplit(".", 1)[-1]] += float(case.get("time"))
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"{name}: {wall:.0f} s wall, {sum(files.values()):.0f} s of tests; {summary}", flush=True)
    return {
        "tier": name,
        "wall": wall,
        "tests": len(cases),
        "failed": len(failed),
        "files": files,
        "code": result.returncode,
    }


def report(runs: list[dict]) -> str:
    lines = [
        f"Device: {device()}; {time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.suite_time --write "
        "BENCHMARKS.md`, from a checkout whose venv, Debian packages and container base image exist. Wall: "
        "ruff and pytest, timed from outside; tests: the sum of pytest's per-test times (JUnit XML), setup included.",
        "",
        "| tier | command | tests | failed | wall | tests' time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        command = "make check" if run["tier"] == "check" else "make test"
        wall, tests = run["wall"], sum(run["files"].values())
        lines.append(
            f"| {run['tier']} | `{command}` | {run['tests']} | {run['failed']} | {wall // 60:.0f} min {wall % 60:02.0f} s "
            f"| {tests // 60:.0f} min {tests % 60:02.0f} s |"
        )
    slowest = max(runs, key=lambda run: run["tests"])
    top = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in slowest["files"].most_common(10))
    lines += ["", f"The slowest files of `make {slowest['tier']}`: {top}."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="suite-time-") as folder:
        runs = [run_tier(name, Path(folder) / f"{name}.xml") for name in args.tiers]
    text = report(runs)
    print(f"\n{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "suite-time", text, SECTION)
    return 0 if all(run["code"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

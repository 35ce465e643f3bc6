"""How benchmarks.gpu.suite runs its steps: each result written as it comes, one time budget for
all, and each step's command run with its limit (in this process for ``--smoke``)."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

from benchmarks.report import write_section

REPO = Path(__file__).resolve().parents[2]
MIN_STEP_S = 10  # a step given less than this by the budget is skipped, not started


class Results:
    """``OUT/results.jsonl`` and ``OUT/BENCHMARKS.md``, both written after every record, from any thread."""

    def __init__(self, out: Path, command: str, headers: dict[str, list[str]]):
        self.out, self.command, self.headers = out, command, headers
        out.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, list[str]] = {}
        self.notes: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def add(self, step: str, record: dict, section: str | None = None, row: str | None = None, label: str = "") -> None:
        """One record; with a ``section``, its ``row`` in the table, or the reason it has none under it."""
        record = {"step": step, "date": str(date.today()), **record}
        with self.lock:
            with open(self.out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            if section is None:
                return
            if row is not None:
                self.rows.setdefault(section, []).append(row)
            elif why := record.get("skipped") or record.get("error"):
                self.notes.setdefault(section, []).append(
                    f"{label}: {'skipped' if 'skipped' in record else 'failed'}, {why}"
                )
            lines = [f"Command: `{self.command}`.", "", *self.headers[section], *self.rows.get(section, [])]
            if self.notes.get(section):
                lines += ["", "Not measured: " + "; ".join(self.notes[section]) + "."]
            marker = f"gpu-suite-{section.replace(' ', '-')}"
            write_section(self.out / "BENCHMARKS.md", marker, "\n".join(lines), f"## GPU suite: {section}")


class Budget:
    """The suite's seconds left: each step gets the least of its own limit and what remains."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def limit(self, wanted: float) -> float:
        return min(wanted, self.left())


def in_process(argv: list[str]) -> int:
    """``python -m MODULE ARGS...`` in this process: --smoke's commands run here, since its
    subprocesses would each spend seconds importing torch. ``argv``: MODULE and ARGS."""
    module, args = argv[0], argv[1:]
    if module.startswith("benchmarks."):  # a script: its main, as `python -m` would run it
        script = importlib.import_module(module)
        script.main(script.get_args_parser().parse_args(args))
        return 0
    return importlib.import_module(f"{module}.__main__").cli(args)  # training, export


def run(command: list[str], limit_s: float, smoke: bool):
    """One step's command: a subprocess with a time limit on the GPU (a CUDA error or a hang in one
    model costs that row only); in-process for ``--smoke`` (:func:`in_process`)."""
    start = time.perf_counter()
    if smoke and command[1] == "-m":
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = in_process(command[2:])
            except SystemExit as err:  # a script's error exit
                code = 0 if err.code is None else 2
                print(err.code, file=sys.stderr)
            except Exception as err:  # a bug in one step is that row's result, as it is in a subprocess
                code = 1
                print(f"{type(err).__name__}: {err}", file=sys.stderr)
        result = subprocess.CompletedProcess(command, code, stdout.getvalue(), stderr.getvalue())
    else:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
    return result, time.perf_counter() - start


def step(results: Results, name: str, record: dict, command: list[str], limit_s: float, args, **where) -> float | None:
    """Run one step's command; its seconds, or None once its skip or failure is recorded as the row's result."""
    if limit_s < MIN_STEP_S and not args.smoke:
        results.add(name, {**record, "skipped": "the suite's --budget-s was spent before this step"}, **where)
        return None
    try:
        result, seconds = run(command, limit_s, args.smoke)
    except subprocess.TimeoutExpired:
        results.add(name, {**record, "error": f"not done within {limit_s:.0f} s"}, **where)
        return None
    if result.returncode != 0:
        results.add(name, {**record, "error": last_line(result.stderr)}, **where)
        return None
    return seconds


def train_step(results: Results, name: str, record: dict, command: list[str], limit_s: float, args, out: Path, **where):
    """A training command: (its log, seconds, why it stopped early or None), or None once its skip or
    failure is recorded. A run its limit stops keeps the epochs it finished: log.csv and last.pt."""
    if limit_s < MIN_STEP_S and not args.smoke:
        results.add(name, {**record, "skipped": "the suite's --budget-s was spent before this step"}, **where)
        return None
    started, cut = time.time(), None
    try:
        result, seconds = run(command, limit_s, args.smoke)
    except subprocess.TimeoutExpired:
        seconds, cut = limit_s, f"stopped by its {limit_s:.0f} s limit"
    else:
        if result.returncode != 0:
            results.add(name, {**record, "error": last_line(result.stderr)}, **where)
            return None
    log = out / "log.csv"
    if not log.is_file() or log.stat().st_mtime < started:  # none, or a previous run's
        results.add(name, {**record, "error": f"{cut}, before its first epoch"}, **where)
        return None
    return read_log(out), seconds, cut


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def steady(log: list[dict], key: str = "examples_per_s") -> float:
    """The median over the epochs after the first (warm-up, compilation), or the only one."""
    return statistics.median(row[key] for row in (log[1:] or log))

"""The console scripts the install puts on PATH run, and name themselves as they were called."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from model_store.cli import run
from model_store.errors import UsageError
from tests.conftest import REPO, run_cli

SCRIPTS = {
    "cnn-train": "training",
    "cnn-export": "export",
    "cnn-store": "model_store",
    "cnn-score": "scoring",
    "cnn-serve": "serving",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_and_its_module_say_how_they_were_called(script):
    by_script = subprocess.run(
        [Path(sys.executable).parent / script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    by_module = run_cli("-m", SCRIPTS[script], "--help")
    assert by_script.returncode == by_module.returncode == 0, by_script.stderr + by_module.stderr
    assert by_script.stdout.startswith(f"usage: {script} ")
    assert by_module.stdout.startswith(f"usage: python -m {SCRIPTS[script]} ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--size", type=int, default=1)
    return parser


def test_a_usage_error_is_one_line_and_exit_2(capsys):
    def main(args):
        raise UsageError(f"--size must be at least 1, got {args.size}")

    assert run(main, _parser(), ["--size", "0"]) == 2
    assert capsys.readouterr().err == "error: --size must be at least 1, got 0\n"


@pytest.mark.parametrize("bug", [KeyError("key"), ValueError("bad"), FileNotFoundError("/internal/path")])
def test_anything_else_keeps_its_traceback(bug):
    """A bug (a KeyError, a ValueError or an OSError the code did not expect) is not dressed up as
    the user's mistake: it propagates, and Python prints its traceback and exits 1."""

    def main(args):
        raise bug

    with pytest.raises(type(bug)):
        run(main, _parser(), [])


def test_a_real_tool_answers_a_bad_model_tag_in_one_line():
    shown = run_cli("-m", "model_store", "show", "not a tag!")
    assert shown.returncode == 2
    assert shown.stderr.startswith("error: not a model tag: ") and shown.stderr.count("\n") == 1, shown.stderr

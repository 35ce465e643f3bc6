"""The console scripts the install puts on PATH run, and name themselves as they were called."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

SCRIPTS = {"cnn-train": "training", "cnn-export": "export", "cnn-store": "model_store", "cnn-score": "scoring"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_and_its_module_say_how_they_were_called(script):
    by_script = subprocess.run(
        [Path(sys.executable).parent / script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    by_module = run_cli("-m", SCRIPTS[script], "--help")
    assert by_script.returncode == by_module.returncode == 0, by_script.stderr + by_module.stderr
    assert by_script.stdout.startswith(f"usage: {script} ")
    assert by_module.stdout.startswith(f"usage: python -m {SCRIPTS[script]} ")

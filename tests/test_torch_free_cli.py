"""After a serving install (no ``[train]`` extra), the training and export CLIs say in one line how
to install what they need, instead of ending in a ModuleNotFoundError traceback."""

import pytest

from tests.conftest import run_cli
from training.extras import INSTALL, exit_if_missing_extra

# What entry points run: `python -m training|export`, and the cnn-train/cnn-export console scripts.
ENTRIES = {
    "python -m training": ["-m", "training", "models"],
    "python -m export": ["-m", "export", "--checkpoint", "x.pt", "--output", "x.onnx"],
    "cnn-train": ["-c", "import sys; from training.__main__ import cli; sys.exit(cli(['models']))"],
    "cnn-export": ["-c", "import sys; from export.__main__ import cli; sys.exit(cli(['--checkpoint', 'x.pt']))"],
}


def without(tmp_path, package: str) -> dict:
    """An environment in which importing ``package`` fails as it does where it is not installed."""
    fake = tmp_path / package
    fake.mkdir()
    message = f"No module named {package!r}"
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={package!r})\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_without_torch_each_cli_names_the_install_command_in_one_line(entry, tmp_path):
    result = run_cli(*ENTRIES[entry], env=without(tmp_path, "torch"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "needs torch, which is not installed" in result.stderr and INSTALL in result.stderr


def test_any_other_missing_module_keeps_its_traceback(tmp_path):
    result = run_cli("-m", "training", "models", env=without(tmp_path, "tqdm"))
    assert result.returncode == 1 and "Traceback" in result.stderr and "No module named 'tqdm'" in result.stderr


def test_a_package_imported_only_when_needed_gets_the_same_answer(capsys):
    with pytest.raises(SystemExit) as exited:
        exit_if_missing_extra(ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript"), "export")
    assert exited.value.code == 2 and "export needs onnxscript" in capsys.readouterr().err
    assert exit_if_missing_extra(ModuleNotFoundError("No module named 'yaml'", name="yaml"), "export") is None

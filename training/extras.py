"""What training and export need beyond the serving install: the ``[train]`` extra (torch,
torchvision, onnx, onnxscript). A serving install lacks it, and its CLIs then answer with one
line that names the install command instead of a ModuleNotFoundError traceback. Torch-free."""

from __future__ import annotations

import sys

TRAIN_EXTRA = ("torch", "torchvision", "onnx", "onnxscript")
INSTALL = "pip install -e '.[train]'"


def exit_if_missing_extra(err: ModuleNotFoundError, program: str) -> None:
    """Exit with status 2 and one line on stderr if ``err`` is a package of the ``[train]`` extra
    missing; return for any other import error, which the caller re-raises: that is a bug to see."""
    name = (err.name or "").partition(".")[0]
    if name not in TRAIN_EXTRA:
        return
    print(
        f"error: {program} needs {name}, which is not installed; install the training extra with "
        f"`{INSTALL}` (the .venv that `make test` builds has it)",
        file=sys.stderr,
    )
    raise SystemExit(2)

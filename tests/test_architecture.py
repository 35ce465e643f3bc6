"""The dependency rules of the design, held by CI: serving never imports torch, training or export;
model_store imports no other stage; int8 quantization takes arrays, not training's datasets. Checked in the source (every import statement) and at run time
(what importing the serving path really loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FORBIDDEN = {
    "serving": {"torch", "torchvision", "training", "export", "onnx"},
    "model_store": {"torch", "torchvision", "training", "export", "serving", "onnx"},
    "export/quantize.py": {"torch", "torchvision", "training"},  # arrays in, a graph out
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_stage_imports_only_what_the_design_allows(package):
    offending = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in ([REPO / package] if package.endswith(".py") else sorted((REPO / package).rglob("*.py")))
    }
    assert {file: names for file, names in offending.items() if names} == {}


def test_the_serving_path_loads_no_torch_at_run_time():
    modules = ["serving.service", "serving.batch", "model_store.store"]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'torchvision', 'training', 'export'}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"

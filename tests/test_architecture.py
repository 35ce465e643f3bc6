"""The dependency rules of the design, held by CI: serving never imports torch, training or export;
model_store imports no other stage, and holds the inference engine both applications use: the
service (serving) and the offline scorer (scoring) never import each other, and only the scorer's
Ray engine imports Ray; int8 quantization takes arrays, not training's datasets; export
takes from training only what rebuilds a checkpoint's model and data, never its flags or loop; the
data spec is torch-free. In ``benchmarks``, scripts import shared modules, never another script,
and nothing reaches for ``sys.path``. Checked in the source (every import statement) and at run time (what
importing the serving path really loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FORBIDDEN = {
    "serving": {"torch", "torchvision", "training", "export", "onnx", "scoring", "ray"},
    "model_store": {"torch", "torchvision", "training", "export", "serving", "onnx", "scoring", "ray"},
    "scoring": {"torch", "torchvision", "training", "export", "onnx", "serving"},
    "export/quantize.py": {"torch", "torchvision", "training"},  # arrays in, a graph out
    "training/dataspec.py": {"torch", "torchvision", "onnx", "export", "serving"},  # read wherever a checkpoint is
    "training/extras.py": {"torch", "torchvision", "onnx", "onnxscript"},  # speaks when they are missing
}
# The training modules export may use: a checkpoint's model, its data spec, the splits rebuilt from
# them, and the one-line answer when the [train] extra the two share is missing.
EXPORT_USES_FROM_TRAINING = {"training.checkpoint", "training.data", "training.dataspec", "training.extras"}


def imported_modules(path: Path) -> set[str]:
    """Full names of every module a file imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from package import module` imports that module too
            names.update(f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}"))
    return names


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository."""
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports."""
    return {name.split(".")[0] for name in imported_modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_stage_imports_only_what_the_design_allows(package):
    offending = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in ([REPO / package] if package.endswith(".py") else sorted((REPO / package).rglob("*.py")))
    }
    assert {file: names for file, names in offending.items() if names} == {}


def test_only_the_ray_engine_imports_ray():
    """Ray is the [scale] extra: the default scorer and everything else run without it."""
    importers = {
        str(path.relative_to(REPO))
        for package in ("serving", "model_store", "scoring", "training", "export")
        for path in sorted((REPO / package).rglob("*.py"))
        if "ray" in imported_packages(path)
    }
    assert importers == {"scoring/ray_engine.py"}


def test_export_takes_from_training_only_the_checkpoint_and_its_data():
    used = {
        str(path.relative_to(REPO)): sorted(
            name
            for name in imported_modules(path)
            if name.split(".")[0] == "training" and name not in EXPORT_USES_FROM_TRAINING
        )
        for path in sorted((REPO / "export").rglob("*.py"))
    }
    assert {file: names for file, names in used.items() if names} == {}


def test_the_serving_path_and_the_scorer_load_no_torch_nor_ray_at_run_time():
    modules = ["serving.service", "scoring.__main__", "scoring.local", "model_store.store"]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'torchvision', 'training', 'export', 'ray'}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _benchmark_modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts): path
        for path in sorted((REPO / "benchmarks").rglob("*.py"))
        if path.name != "__init__.py"
    }


def is_script(path: Path) -> bool:
    """A file run as a program: it has an ``if __name__ == "__main__":`` block."""
    for node in ast.parse(path.read_text(), str(path)).body:
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
            return True
    return False


def test_benchmark_scripts_import_shared_modules_and_never_another_script():
    modules = _benchmark_modules()
    scripts = {name for name, path in modules.items() if is_script(path)}
    assert {"benchmarks.serving_compare", "benchmarks.gpu.suite", "benchmarks.closed_loop"} <= scripts
    assert {"benchmarks.images", "benchmarks.servers", "benchmarks.load", "benchmarks.report"}.isdisjoint(scripts)
    imports_a_script = {name: sorted(imported_modules(path) & (scripts - {name})) for name, path in modules.items()}
    assert {name: found for name, found in imports_a_script.items() if found} == {}
    # Nor the tests, which use the shared modules as the scripts do (a script's own test excepted:
    # a parse, a helper of the script under test).
    by_tests = {
        str(path.relative_to(REPO)): sorted(
            imported_modules(path) & scripts - {"benchmarks.closed_loop", "benchmarks.ood_eval", "benchmarks.gpu.suite"}
        )
        for path in sorted((REPO / "tests").glob("*.py"))
    }
    assert {file: found for file, found in by_tests.items() if found} == {}


def test_no_benchmark_edits_sys_path_or_imports_a_neighbour_by_its_bare_name():
    """Run as ``python -m benchmarks.NAME`` from the repository root, they import as the package they are."""
    modules = _benchmark_modules()
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}  # serving is the service, not gpu/serving.py
    bare = {name.rsplit(".", 1)[-1] for name in modules} - packages
    found = {
        name: sorted(imported_modules(path) & bare) + (["sys.path"] if "sys.path" in path.read_text() else [])
        for name, path in modules.items()
    }
    assert {name: what for name, what in found.items() if what} == {}


def test_sending_fashion_mnist_images_imports_no_torch():
    code = "import sys, benchmarks.images, benchmarks.load, benchmarks.servers, benchmarks.wrk_load; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "False", result.stderr[-2000:]

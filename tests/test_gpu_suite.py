"""benchmarks/gpu_suite.py --smoke: the GPU machine's whole sequence, on CPU at tiny sizes, so that the
one prepared command is known to run before a GPU lease is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_smoke_run_trains_exports_and_measures_every_row_and_writes_as_it_goes(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == ["environment"] + ["train"] * 6 + ["export"] * 6 + ["export_speed"]
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    assert "CPUExecutionProvider" in records[0]["providers"] and records[0]["torch"] and records[0]["missing"] == []
    trained = {r["model"] for r in records if r["step"] == "train"}
    assert trained == {"alexnet", "vgg11", "nin", "googlenet", "resnet18", "densenet"}
    assert all(r["parity"]["top1_agreement"] == 1.0 for r in records if r["step"] == "export")
    assert records[-1]["returncode"] == 0
    document = (tmp_path / "BENCHMARKS.md").read_text()
    for marker in ("gpu-suite-training", "gpu-suite-export", "export-speed"):
        assert f"<!-- {marker}:start -->" in document, marker
    assert document.count("| CPU (smoke) |") == 6 and (tmp_path / "onnx" / "densenet.onnx").is_file()

"""python -m benchmarks.gpu.suite --smoke: the GPU machine's whole sequence, on CPU at tiny sizes, so that the
one prepared command is known to run before a GPU lease is spent on it. Every step yields rows; the
ones that need CUDA say so."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import suite

REPO = Path(__file__).resolve().parents[1]
MODELS = ["alexnet", "vgg11", "nin", "googlenet", "resnet18", "densenet", "lenet"]
# The rows the smoke run trains and exports: those a later step reads (ResNet-18: the long recipe and
# the serving; LeNet: the textbook's throughput), and a DenseNet. Every other row's own command is
# checked below without its minute of training and export: test_every_row_s_command_builds_its_model.
SMOKE_ROWS = ["resnet18", "densenet", "lenet"]


@pytest.mark.processes
def test_the_smoke_run_goes_through_every_step_and_says_why_of_each_it_skips(tmp_path):
    # The Python load client, as on the GPU machines, which have no wrk.
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu.suite",
        "--out",
        str(tmp_path),
        "--smoke",
        "--load-client",
        "python",
        "--rows",
        *SMOKE_ROWS,
    ]
    # A bound for a hung run only: it takes about 50 s on 2 cores here, several times that on one slow core.
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    assert all(r["skipped"] for r in records if "skipped" in r)  # each skip has its reason
    by_step: dict[str, list[dict]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    assert [r["step"] for r in records][0] == "environment" and records[-1]["step"] == "done"
    steps = "environment train export gpu_parity long_recipe export_speed compile serving_limit serving done"
    assert list(by_step) == steps.split()

    env = by_step["environment"][0]
    assert "CPUExecutionProvider" in env["providers"] and env["torch"] and env["missing"] == []
    assert [r["model"] for r in by_step["train"]] == MODELS
    trained = {r["model"]: r for r in by_step["train"]}
    assert {m for m, r in trained.items() if r.get("skipped") == "not in --rows"} == set(MODELS) - set(SMOKE_ROWS)
    assert trained["resnet18"]["textbook_examples_per_s"] == 4700 and trained["resnet18"]["epochs"] == 1

    exports = {(r["model"], r["precision"]): r for r in by_step["export"] if "precision" in r}
    assert all(exports[m, "fp32"]["parity"]["max_abs_logit_diff"] <= 1e-4 for m in SMOKE_ROWS)
    assert all("no CUDA" in exports[m, "fp16"]["skipped"] for m in SMOKE_ROWS)
    assert {r["model"]: r["skipped"] for r in by_step["export"] if "precision" not in r} == {
        "resnet18-long": "exported on a GPU only"
    }
    parity = by_step["gpu_parity"]
    assert [r["model"] for r in parity] == SMOKE_ROWS and all("skipped" in r for r in parity)
    assert (tmp_path / "work" / "onnx" / "densenet.onnx").is_file()

    long = by_step["long_recipe"][0]
    assert long["goal"] == 0.95 and "--random-erasing 0.25" in long["command"] and long["met"] in (True, False)

    speed = by_step["export_speed"]
    measured = {r["engine"] for r in speed if "seconds_64" in r}
    assert measured == {"eager fp32", "onnx fp32", "onnx int8"}
    cuda = [r for r in speed if r.get("device") == "cuda"]
    assert {r["engine"] for r in cuda} == {"eager fp32", "onnx fp32", "onnx fp16", "tensorrt fp32", "tensorrt fp16"}
    assert all(r["skipped"] == "no CUDA (CPU smoke)" for r in cuda)
    assert speed[-1]["device"] == "cpu" and speed[-1]["seconds"] > 0

    compiled = by_step["compile"][0]
    assert compiled["skipped"] == "not measured on CPU smoke" and compiled["eager_examples_per_s"] > 0

    limit, served = by_step["serving_limit"][0], by_step["serving"][0]
    assert limit["decode_img_s"] > 0 and limit["model_img_s"] > 0 and limit["batch"] == 64
    assert served["requests"] > 0 and served["errors"] == 0 and served["provider"] == "CPUExecutionProvider"
    assert (
        served["client"].startswith("python closed loop") and served["ratio"] == served["rps"] / limit["decode_img_s"]
    )

    document = (tmp_path / "BENCHMARKS.md").read_text()
    for section in ("environment", "training", "long-recipe", "export", "gpu-parity", "compile", "serving"):
        assert f"<!-- gpu-suite-{section}:start -->" in document, section
    assert "<!-- export-speed:start -->" in document and document.count("| CPU (smoke) |") == len(SMOKE_ROWS)
    assert "densenet fp16: skipped, no CUDA" in document and "resnet18: skipped, not measured on CPU smoke" in document


@pytest.mark.parametrize("row", suite.ROWS, ids=[row[0] for row in suite.ROWS])
def test_every_row_s_command_builds_its_model(row):
    """Each row as the GPU machine runs it: its training command parses, and the network it names,
    with its model arguments, runs at both of the row's sizes (the smoke run trains only SMOKE_ROWS)."""
    import torch

    from training.__main__ import get_args_parser
    from training.models import get_model
    from training.train import check_args, parse_model_args

    model, textbook_size, model_args, smoke_size = row
    for smoke, size in ((False, textbook_size), (True, smoke_size)):
        options = argparse.Namespace(smoke=smoke, data_dir=None)
        flags = [*model_args, *suite.recipe(size), "--epochs", "10"]
        command = suite.training_command(options, model, size, flags, Path("run"))
        args = get_args_parser().parse_args(command[3:])  # after python -m training
        check_args(args)  # training's own checks of its flags
        assert (args.model, args.size) == (model, size)
        network = get_model(model, 1, 10, **parse_model_args(args.model_arg)).eval()
        with torch.no_grad():
            assert network(torch.zeros(1, 1, size, size)).shape == (1, 10)


def test_the_python_load_client_reads_sized_and_chunked_answers():
    from benchmarks.closed_loop import read_answer

    async def answers(data: bytes) -> list[tuple[int, bool]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return [await read_answer(reader), await read_answer(reader)]

    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    chunked = (
        b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert asyncio.run(answers(sized + chunked)) == [(200, False), (503, True)]


@pytest.mark.processes
def test_a_training_stopped_by_its_limit_keeps_the_epochs_it_finished(tmp_path):
    from benchmarks.gpu.steps import Results, train_step

    out, results = tmp_path / "run", Results(tmp_path / "out", "test", {})
    args = argparse.Namespace(smoke=True)  # no budget floor; a plain command still runs as a subprocess
    one_epoch = "epoch,test_acc,examples_per_s,seconds\n1,0.5,100.0,1.5\n"
    # Each command writes (or not) and then never ends: only the limit stops it. Time is the subject;
    # writing one small file takes a fresh Python some 50 ms, a fortieth of the 2 s limit.
    forever = "import threading; threading.Event().wait()"
    script = f"import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(); (p / 'log.csv').write_text({one_epoch!r}); {forever}"
    log, seconds, cut = train_step(results, "train", {}, [sys.executable, "-c", script, str(out)], 2, args, out)
    assert log == [{"epoch": 1.0, "test_acc": 0.5, "examples_per_s": 100.0, "seconds": 1.5}]
    assert seconds == 2 and cut == "stopped by its 2 s limit"
    silent = [sys.executable, "-c", forever]  # the old log.csv is not this run's
    assert train_step(results, "train", {"model": "m"}, silent, 1, args, out) is None
    assert json.loads((tmp_path / "out" / "results.jsonl").read_text())["error"] == (
        "stopped by its 1 s limit, before its first epoch"
    )

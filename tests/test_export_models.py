"""Every registered model exports to a verified graph; the fp16 and float-input variants too."""

import contextlib
import io
import multiprocessing
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import get_args_parser, main
from model_store import ModelCard
from model_store.card import ONNX_METADATA_KEY
from model_store.engine import OnnxClassifier
from model_store.store import read_onnx_card
from tests.conftest import png_bytes, run_cli
from tests.test_models import ARCH_ARGS, small_size
from training.checkpoint import save_checkpoint
from training.models import build_model, list_models


def synthetic_checkpoint(name: str, path) -> None:
    """A model with non-trivial BatchNorm statistics, recorded as trained on the synthetic set."""
    torch.manual_seed(0)
    size = small_size(name)
    card = ModelCard(
        arch=name,
        arch_args=ARCH_ARGS.get(name, {}),
        class_names=[f"shape{i}" for i in range(10)],
        in_channels=1,
        height=size,
        width=size,
        mean=(0.2,),
        std=(0.3,),
        dataset="synthetic",
    )
    model = build_model(card).train()
    with torch.no_grad():
        for _ in range(2):  # moves running mean/var away from 0/1, so folding them is really tested
            model(torch.randint(0, 256, (4, 1, size, size), dtype=torch.uint8))
    save_checkpoint(path, model.eval(), card, args={"dataset": "synthetic", "synthetic_size": 64, "seed": 0})


def export_synthetic(name: str, folder: str) -> str:
    """``name``'s synthetic checkpoint exported as `python -m export` exports it, in a process of
    the pool below; its card as JSON."""
    torch.set_num_threads(1)  # two of these share 2 cores
    synthetic_checkpoint(name, Path(folder) / "model.pt")
    flags = ["--checkpoint", f"{folder}/model.pt", "--output", f"{folder}/model.onnx", "--verify-batch-size", "32"]
    with contextlib.redirect_stdout(io.StringIO()):
        return main(get_args_parser().parse_args(flags)).to_json()


@pytest.fixture(scope="module")
def every_export(tmp_path_factory) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Every registered model exported, two at a time in processes of their own: the exporter is
    single-threaded Python, and the thirteen exports, one after another, were two minutes here."""
    root = tmp_path_factory.mktemp("every-export")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        exports = {}
        for name in list_models():
            (root / name).mkdir()
            exports[name] = (root / name, pool.submit(export_synthetic, name, str(root / name)))
        yield exports
        pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_without_batchnorm_or_dropout_and_matches_pytorch(name, every_export):
    folder, card_json = every_export[name][0], every_export[name][1].result()
    card = ModelCard.from_json(card_json)
    graph = onnx.load(str(folder / "model.onnx"))
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Dropout"] == 0
    onnx.checker.check_model(graph, full_check=True)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert {p.key: p.value for p in graph.metadata_props}[ONNX_METADATA_KEY] == card.to_json()
    parity = card.export["parity"]
    # the logits' bound, which implies the same top-1 but at ties (export.__main__.check_parity)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["images"] == 64
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(card).modules())
    folded = card.export["eval_mode"]
    assert folded["batchnorm_folded"] + folded["batchnorm_to_scale_shift"] == batchnorms
    assert folded["batchnorm_to_scale_shift"] == (20 if name == "densenet" else 0)


def test_fp16_and_float_input_exports_serve_the_same_answers(checkpoint, exported, tmp_path, fashion_test):
    outputs = {}
    for variant, flags in (("fp32", None), ("fp16", ["--fp16"]), ("float", ["--float-input"])):
        path = tmp_path / f"{variant}.onnx"
        if flags is None:  # the session's export of this checkpoint, with no flags
            path, card = exported, read_onnx_card(exported)
        else:
            card = main(get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(path), *flags]))
        assert card.export["precision"] == ("float16" if variant == "fp16" else "float32")
        graph = onnx.load(str(path)).graph
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits stay float32
        expected_input = onnx.TensorProto.FLOAT if variant == "float" else onnx.TensorProto.UINT8
        assert graph.input[0].type.tensor_type.elem_type == expected_input
        assert card.export["parity"]["top1_agreement"] >= 0.999
        outputs[variant] = OnnxClassifier(path, device="cpu")
    from model_store import image_bytes_to_input

    images = fashion_test[0][:200]
    pixels = np.stack([image_bytes_to_input(png_bytes(image), outputs["fp32"].card) for image in images])
    reference = outputs["fp32"].predict(pixels)
    assert np.abs(outputs["float"].predict(pixels) - reference).max() < 1e-5
    assert (outputs["fp16"].predict(pixels).argmax(1) == reference.argmax(1)).mean() >= 0.99
    assert network_bytes(tmp_path / "fp16.onnx") < 0.7 * network_bytes(exported)


def test_a_checkpoint_for_another_architecture_fails_with_the_documented_message(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["card"]["arch"], payload["card"]["arch_args"] = "resnet18", {}
    torch.save(payload, tmp_path / "wrong.pt")
    result = run_cli("-m", "export", "--checkpoint", str(tmp_path / "wrong.pt"), "--output", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: checkpoint")
        and "weights do not fit a resnet18 with 10 classes" in result.stderr
    )
    assert not (tmp_path / "m.onnx").exists()


def test_int8_export_is_quantized_keeps_its_accuracy_and_serves(checkpoint, exported, tmp_path, fashion_test):
    models = {}  # against the session's fp32 export of the same checkpoint
    for variant, flags in (("int8", ["--int8"]), ("int8-float", ["--int8", "--float-input"])):
        path = tmp_path / f"{variant}.onnx"
        card = main(get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(path), *flags]))
        graph = onnx.load(str(path)).graph
        ops = Counter(node.op_type for node in graph.node)
        assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 1 and ops["BatchNormalization"] == 0
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        parity = card.export["parity"]
        assert card.export["precision"] == "int8" and card.export["quantization"]["calibration_images"] == 512
        assert parity["images"] >= 1000 and parity["top1_agreement"] >= 0.99
        assert parity["accuracy_onnx"] >= parity["accuracy_torch"] - 0.005
        models[variant] = OnnxClassifier(path, device="cpu")
    # ONNX Runtime fuses the QDQ pairs into integer kernels: that, not the file format, is the speed-up.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert network_bytes(tmp_path / "int8.onnx") < 0.5 * network_bytes(exported)

    from model_store import image_bytes_to_input

    reference = OnnxClassifier(exported, device="cpu")
    images, labels = fashion_test[0][:300], fashion_test[1][:300]
    pixels = np.stack([image_bytes_to_input(png_bytes(image), reference.card) for image in images])
    expected = reference.predict(pixels).argmax(1)
    for model in models.values():
        got = model.predict(pixels).argmax(1)
        assert (got == expected).mean() >= 0.98 and (got == labels).mean() >= (expected == labels).mean() - 0.02


def test_int8_bounds_fail_loudly():
    from export.__main__ import check_parity
    from export.onnx_export import ExportError

    good = {"top1_agreement": 0.995, "accuracy_torch": 0.90, "accuracy_onnx": 0.898, "max_abs_logit_diff": 0.3}
    check_parity(good, "int8")
    for worse in ({"top1_agreement": 0.98}, {"accuracy_onnx": 0.89}):
        with pytest.raises(ExportError, match=r"the int8 graph agrees .* \(bounds: at least 0.99, at most 0.005\)"):
            check_parity({**good, **worse}, "int8")
    with pytest.raises(ExportError, match=r"disagrees with PyTorch beyond the bound: max \|logit diff\| 3.00e-01 > "):
        check_parity(good, "float32")  # what int8 may do, fp32 may not
    # fp32 within the bound: a class picked otherwise can only be a tie, which another CPU may break
    check_parity({**good, "max_abs_logit_diff": 5e-5, "top1_agreement": 0.999}, "float32")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--int8", "--fp16"], "argument --fp16: not allowed with argument --int8"),
        (["--int8", "--calibration-images", "0"], "error: --calibration-images must be at least 1, got 0"),
    ],
)
def test_bad_int8_options_fail_in_one_line_and_write_nothing(checkpoint, tmp_path, flags, message):
    result = run_cli("-m", "export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx"), *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_parity_reports_the_graphs_own_accuracy_not_pytorchs(checkpoint, fashion_test):
    from onnx import numpy_helper

    from export.onnx_export import compare_with_torch, export_graph, serialize
    from training.checkpoint import load_model

    model, card, _ = load_model(checkpoint)
    proto = export_graph(model, card)[0]
    # A graph that strays from PyTorch on purpose: the last layer's bias for class 0 made huge, so the
    # graph answers 0 for every image while PyTorch mostly does not.
    bias_name = proto.graph.node[-1].input[2]
    bias = next(t for t in proto.graph.initializer if t.name == bias_name)
    values = numpy_helper.to_array(bias).copy()
    values[0] += 1e4
    bias.CopyFrom(numpy_helper.from_array(values, bias_name))
    pixels = fashion_test[0][:500, None].copy()  # the fixture is read-only; torch wants writable arrays
    report = compare_with_torch(model, serialize(proto), pixels, (1, 256), labels=np.zeros(500, dtype=np.int64))
    assert report["accuracy_onnx"] == 1.0
    assert report["accuracy_torch"] == pytest.approx(report["top1_agreement"]) and report["accuracy_torch"] < 0.5


def network_bytes(path: Path) -> int:
    """The bytes of a graph's own weights: its constants less the OOD head's (export.ood_head), whose
    bank of held-out features stays float32 whatever precision the network is exported in."""
    return sum(init.ByteSize() for init in onnx.load(str(path)).graph.initializer if not init.name.startswith("ood_"))

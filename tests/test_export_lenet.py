import re
from collections import Counter

import onnx
import pytest

from model_store.card import ONNX_METADATA_KEY, ModelCard
from tests.conftest import run_cli


def test_graph_has_no_batchnorm_or_dropout_and_passes_the_full_checker(exported):
    model = onnx.load(str(exported))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Dropout"] == 0
    assert ops["Conv"] == 2 and ops["Gemm"] == 3  # lenet_bn's four BatchNorms were folded in, not dropped
    onnx.checker.check_model(model, full_check=True)


def test_graph_takes_uint8_pixels_with_a_dynamic_batch(exported):
    graph = onnx.load(str(exported)).graph
    pixels = graph.input[0].type.tensor_type
    assert pixels.elem_type == onnx.TensorProto.UINT8
    assert pixels.shape.dim[0].dim_param and [d.dim_value for d in pixels.shape.dim[1:]] == [1, 28, 28]


def test_card_travels_in_metadata_with_the_parity_figures(exported, checkpoint):
    from model_store.files import file_sha256
    from training.checkpoint import read_checkpoint

    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    card = ModelCard.from_json(props[ONNX_METADATA_KEY])
    trained = ModelCard.from_dict(read_checkpoint(checkpoint)["card"])
    assert card.class_names == trained.class_names and card.mean == trained.mean
    # training's metrics, and what calibrating on the held-out images did (tests/test_calibration.py)
    assert card.metrics == {**trained.metrics, "calibration": card.metrics["calibration"]} and card.calibration
    parity = card.export["parity"]
    # the logits' bound, which implies the same top-1 but at ties (export.__main__.check_parity)
    assert parity["images"] >= 1000 and parity["max_abs_logit_diff"] <= 1e-4
    assert card.export["checkpoint_sha256"] == file_sha256(checkpoint)


def test_cli_prints_the_parity_figures(exported):
    printed = (exported.parent / "export.log").read_text()  # the entry point's output (conftest.exported)
    assert "verified on 1000 fashion-mnist evaluation images" in printed
    assert re.search(r"top-1 agreement [01]\.\d{4}, max \|logit diff\| \d\.\d\de-\d\d", printed)
    assert "eval mode: 4 BatchNorm folded into conv/linear weights" in printed
    assert f"ok: wrote {exported}" in printed


@pytest.mark.parametrize("content, message", [(b"", "not a readable PyTorch checkpoint"), (None, "does not exist")])
def test_bad_checkpoints_fail_in_one_line_and_write_nothing(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("-m", "export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()

"""Post-training int8 quantization of an exported graph, calibrated on the images it is given
(the export CLI samples them from the run's training split): arrays in, a graph out; no training code.

The graph stays an ordinary ONNX model in QDQ form (QuantizeLinear / DequantizeLinear around each
conv and linear layer), which ONNX Runtime's CPU provider fuses into integer kernels. The settings
follow ONNX Runtime's advice for x86 CPUs: uint8 activations per tensor, int8 weights per output
channel, ranges calibrated by min/max. Input (uint8 pixels or normalized floats) and output (float32
logits) keep their types, so serving needs nothing new.

Weights use 7 of their 8 bits. x86 CPUs without VNNI multiply uint8 by int8 in pairs summed into
int16, which two full-range products can overflow; 7-bit weights cannot. The graph is verified on
the exporting machine but served wherever it is deployed, so it must not depend on VNNI. Measured
side by side, the narrower range cost neither accuracy (ResNet-34 and LeNet on the 10,000
Fashion-MNIST test images) nor speed on a VNNI CPU: ``benchmarks/int8_accuracy.py``, figures in
BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

CALIBRATION_BATCH = 32
DEFAULT_CALIBRATION_IMAGES = 512
# What quantize_int8 does, as the model card records it.
SETTINGS = {
    "calibration_split": "train",
    "calibration_method": "minmax",
    "weights": "int8 per channel, 7-bit range",
    "activations": "uint8 per tensor",
}


class _Batches(CalibrationDataReader):
    """Feeds the calibration images to ONNX Runtime a batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.feeds = iter(
            {input_name: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_int8(proto: onnx.ModelProto, calibration: np.ndarray, reduce_range: bool = True) -> onnx.ModelProto:
    """The graph with int8 weights and uint8 activations, activation ranges taken from ``calibration``
    (inputs in the graph's own input type and layout, [N, C, H, W]). ``reduce_range=False`` gives
    the weights all 8 bits, for comparison only: see the module's note."""
    if len(calibration) == 0:
        raise ValueError("int8 quantization needs at least one calibration image")
    input_name = proto.graph.input[0].name
    # The quantizer's API works on files; nothing of them outlives this function.
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        tmp = Path(tmp)
        onnx.save_model(proto, tmp / "float.onnx")
        # Shape inference and constant folding first, so that every tensor gets a range.
        quant_pre_process(tmp / "float.onnx", tmp / "prepared.onnx")
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(max(quiet, logging.WARNING))  # the quantizer logs each step at INFO
        try:
            quantize_static(
                tmp / "prepared.onnx",
                tmp / "int8.onnx",
                _Batches(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            logging.getLogger().setLevel(quiet)
        return onnx.load_model(tmp / "int8.onnx")

"""Request bodies of the Open Inference Protocol over HTTP, encoded as ``tritonclient.http`` encodes
them, and of ``/classify``, written for wrk: the ways ``benchmarks.protocol_compare`` and
``benchmarks.grpc_compare`` load a service with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.http as triton

from benchmarks.images import fashion_images, fashion_pngs
from benchmarks.load import write_bodies, write_raw_bodies


def infer_bodies(inputs_of, outputs=None, binary_output: bool = True) -> tuple[list[bytes], int | None]:
    """tritonclient's encoding of one request per input; JSON headers padded with spaces (valid
    JSON) to one length, since wrk sends one Inference-Header-Content-Length for all."""
    encoded = []
    for inputs in inputs_of:
        body, length = triton.InferenceServerClient.generate_request_body(
            inputs, outputs=outputs() if outputs else None
        )
        encoded.append((body, length))
    if encoded[0][1] is None:
        return [body for body, _ in encoded], None
    width = max(length for _, length in encoded)
    return [body[:length] + b" " * (width - length) + body[length:] for body, length in encoded], width


def pixels_input(image: np.ndarray, binary: bool) -> list:
    tensor = triton.InferInput("pixels", [1, 1, *image.shape], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(image[None, None]), binary_data=binary)
    return [tensor]


def png_input(png: bytes) -> list:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png], dtype=np.object_))
    return [tensor]


def write_ways(workdir: Path, count: int) -> dict:
    images, pngs = fashion_images(count), fashion_pngs(count)
    octet, ways = "application/octet-stream", {}
    ways["classify"] = write_bodies(workdir / "classify", pngs, "image/png")
    binary_out = lambda: [triton.InferRequestedOutput("probabilities", binary_data=True)]  # noqa: E731
    top3 = lambda: [triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3)]  # noqa: E731
    json_out = lambda: [triton.InferRequestedOutput("probabilities", binary_data=False)]  # noqa: E731
    for way, inputs, outputs in (
        ("v2-pixels", [pixels_input(a, True) for a in images], binary_out),
        ("v2-pixels-top3", [pixels_input(a, True) for a in images], top3),
        ("v2-png", [png_input(p) for p in pngs], binary_out),
        ("v2-json", [pixels_input(a, False) for a in images], json_out),
    ):
        bodies, length = infer_bodies(inputs, outputs)
        headers = (f"Inference-Header-Content-Length: {length}",) if length else ()
        ways[way] = write_raw_bodies(workdir / way, bodies, octet if length else "application/json", headers)
    return ways

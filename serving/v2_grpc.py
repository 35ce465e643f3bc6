"""The Open Inference Protocol's gRPC messages (``inference.GRPCInferenceService``), parsed into and
encoded from what ``serving.v2`` parses the REST protocol into, so that one set of checks judges
both: the same inputs (``pixels`` UINT8 [N, C, H, W], ``image`` BYTES [N]), the same output
(``probabilities``, or its top-k with Triton's classification extension), the same errors.

A tensor's values come in ``raw_input_contents`` (what ``tritonclient.grpc`` sends) or in its
typed ``contents``; answers always go back in ``raw_output_contents``, as Triton answers. Every
count a message declares is checked against the model before anything is sized by it: the message
itself is bounded by gRPC's maximum receive size, which the server sets to the HTTP body limit.
This module parses and encodes; it knows nothing of the server, the status codes or the batcher.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import json_format

from serving import v2
from serving.errors import RequestError
from serving.protocol import grpc_service_pb2 as pb
from serving.protocol import model_config_pb2

CONTENTS = {"UINT8": "uint_contents", "BYTES": "bytes_contents"}  # the typed field each input's values use


def parse_infer(request: pb.ModelInferRequest, card, max_images: int) -> v2.InferRequest:
    """A ModelInferRequest as :class:`serving.v2.InferRequest`, checked against the model's ``card``.
    Each field is read once: a read of a protobuf field costs as much as a check (this runs on
    every call, on the event loop)."""
    inputs = request.inputs
    if len(inputs) != 1:
        raise RequestError(
            f"'inputs' must be one tensor: {v2.PIXELS!r} (UINT8) or {v2.IMAGE!r} (BYTES); got {len(inputs)}"
        )
    tensor = inputs[0]
    shape = list(tensor.shape)
    if shape and min(shape) < 0:
        raise RequestError(f"input {v2.shown(tensor.name)}: 'shape' must be non-negative integers, got {shape}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise RequestError(f"raw_input_contents has {len(raw)} entries for 1 input")
        data = raw[0]
    else:
        data = _typed_contents(tensor, shape)
    given = tensor.parameters
    parameters = {key: _value(value) for key, value in given.items()} if given else {}
    pixels, images = v2.check_input(tensor.name, tensor.datatype, shape, data, parameters, card, max_images)
    asked = [
        {"name": output.name, "parameters": {key: _value(value) for key, value in output.parameters.items()}}
        for output in request.outputs
    ]
    outputs = v2.requested_outputs({"outputs": asked or None}, card.num_classes)
    return v2.InferRequest(v2.request_id(request.id or None), pixels, images, outputs)


def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int]):
    """The values of ``contents`` for the input's datatype: a list of numbers or of bytes, after
    checking that their count is the shape's (a list of a million numbers is not built to be refused)."""
    field = CONTENTS.get(tensor.datatype)
    if field is None:  # check_input names what each input takes
        return b""
    values = getattr(tensor.contents, field)
    expected = math.prod(shape) if tensor.datatype == "UINT8" else (shape or [0])[0]  # exact, as v2._pixels
    if len(values) != expected:
        raise RequestError(
            f"input {v2.shown(tensor.name)} of shape {shape} needs {expected:,} values in contents.{field}, "
            f"got {len(values):,}"
        )
    return list(values)


def _value(parameter: pb.InferParameter):
    """An InferParameter's value, as JSON would have it (a request's ``classification`` is an int64)."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def encode_infer(
    request: v2.InferRequest, probabilities: np.ndarray, name: str, version: str, class_names
) -> pb.ModelInferResponse:
    """The answer: each asked output in ``raw_output_contents``, FP32 probabilities or the
    classification extension's ``"score:index:label"`` strings as a BYTES tensor."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id or "")
    for output in request.outputs:
        if output.classification:
            strings = v2.classification(probabilities, class_names, output.classification)
            raw = v2.serialize_bytes([s.encode() for row in strings for s in row])
            response.outputs.add(
                name=v2.PROBABILITIES, datatype="BYTES", shape=[len(probabilities), output.classification]
            )
        else:
            raw = probabilities.astype("<f4").tobytes()
            response.outputs.add(name=v2.PROBABILITIES, datatype="FP32", shape=list(probabilities.shape))
        response.raw_output_contents.append(raw)
    return response


def model_metadata(name: str, version: str, card) -> pb.ModelMetadataResponse:
    return json_format.ParseDict(v2.model_metadata(name, version, card), pb.ModelMetadataResponse())


def model_config(name: str, card, max_batch_images: int, provider: str) -> pb.ModelConfigResponse:
    """Triton's model configuration, the same as REST's ``/config`` (what its image client reads)."""
    config = json_format.ParseDict(
        v2.model_config(name, card, max_batch_images, provider), model_config_pb2.ModelConfig()
    )
    return pb.ModelConfigResponse(config=config)


def repository_index(entries: list[dict]) -> pb.RepositoryIndexResponse:
    return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

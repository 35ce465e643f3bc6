"""The Open Inference Protocol (KServe v2) over REST, the one Triton, KServe, MLServer and
TorchServe speak, so that their clients (``tritonclient.http``, ``kserve``) work unchanged.

Spec: kserve/open-inference-protocol, ``specification/protocol/inference_rest.md``, with three of
Triton's extensions: classification (top-k as ``"score:index:label"`` strings), binary tensor data
(``Inference-Header-Content-Length``: a JSON header, then raw tensors), and model configuration
(``GET /v2/models/{m}/config``, which Triton's image client reads).

Each model has one output and takes one of two inputs:

- ``pixels``: ``UINT8 [N, C, H, W]`` at the model's size, the graph's own input: no decoding;
- ``image``: ``BYTES [N]``, encoded images, decoded by the same ``to_input`` as ``/classify``.

The output ``probabilities`` is the engine's: calibrated with the card's temperature when the model
has one, as ``/classify``'s are; the protocol has no place for ``unsure``, so v2 answers leave it out.

Model metadata lists ``pixels`` only: the input a client must send, as Triton lists it, and Triton's
image client expects exactly one. This module parses and encodes; it knows nothing of HTTP
statuses (it raises ``serving.errors``) nor of batching (``serving.handlers`` runs the requests).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from model_store.engine import top_k
from serving.errors import MethodNotAllowed, NotFound, RequestError, UnsupportedMediaType

PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX Runtime model
PIXELS, IMAGE, PROBABILITIES = "pixels", "image", "probabilities"
HEADER_LENGTH = b"inference-header-content-length"
# The JSON part is parsed on the event loop into Python lists before it becomes an array: its size
# bounds that time and memory. Tensors larger than this travel as binary data, as tritonclient sends them.
MAX_JSON_BYTES = 4 * 2**20
ID_MAX_CHARS = 128  # a request id is echoed in the answer; it comes from the client
# Every v2 path, for the 404 that lists them.
PATHS = (
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/{model}[/versions/{version}]",
    "GET /v2/models/{model}[/versions/{version}]/ready",
    "GET /v2/models/{model}[/versions/{version}]/config",
    "POST /v2/models/{model}[/versions/{version}]/infer",
    "POST /v2/repository/index",
    "POST /v2/repository/models/{model}/load",
    "POST /v2/repository/models/{model}/unload",
)
SERVER_NAME = "classic-cnns"
try:
    SERVER_VERSION = importlib.metadata.version(SERVER_NAME)
except importlib.metadata.PackageNotFoundError:  # a bento carries the sources, not the installed project
    SERVER_VERSION = "unknown"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # probes, like /livez and /readyz


@dataclass(frozen=True)
class Route:
    """A v2 path, parsed: ``kind`` names the endpoint; ``model``, ``version`` come from the path."""

    kind: str  # server, live, ready, model, model_ready, config, infer, index, load, unload
    model: str | None = None
    version: str | None = None

    @property
    def tag(self) -> str | None:
        """What ``ModelSet.get`` takes: ``name`` or ``name:version``."""
        return f"{self.model}:{self.version}" if self.version else self.model

    @property
    def method(self) -> str:
        return "POST" if self.kind in ("infer", "index", "load", "unload") else "GET"


def route(method: str, path: str) -> Route:
    """The endpoint a request is for, or the error: :class:`NotFound` for a path that is none,
    :class:`MethodNotAllowed` for the wrong method on one that is."""
    parts = path.split("/")[2:]  # "", "v2", ...
    found = _parse(parts)
    if found is None:
        raise NotFound(f"no such path; the v2 routes are: {'; '.join(PATHS)}")
    if method != found.method:
        raise MethodNotAllowed(f"{path} takes {found.method}, not {method}")
    return found


def _parse(parts: list[str]) -> Route | None:
    if parts in ([], [""]):
        return Route("server")
    if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
        return Route(parts[1])
    if parts[0] == "repository":
        if parts[1:] == ["index"]:
            return Route("index")
        if len(parts) == 4 and parts[1] == "models" and parts[2] and parts[3] in ("load", "unload"):
            return Route(parts[3], parts[2])
        return None
    if parts[0] != "models" or len(parts) < 2 or not parts[1]:
        return None
    model, rest, version = parts[1], parts[2:], None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    kinds = {(): "model", ("ready",): "model_ready", ("config",): "config", ("infer",): "infer"}
    kind = kinds.get(tuple(rest))
    return Route(kind, model, version) if kind else None


# -- metadata ---------------------------------------------------------------------------------


def model_metadata(name: str, version: str, card) -> dict:
    """``GET /v2/models/{m}``: the input a client sends and the output it gets, batch dimension -1."""
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [-1, card.in_channels, card.height, card.width]}],
        "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, card.num_classes]}],
    }


def model_config(name: str, card, max_batch_images: int, provider: str) -> dict:
    """``GET /v2/models/{m}/config`` in Triton's JSON form (its ``model_config.proto``): what
    Triton's image client reads to size and lay out its input."""
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": max_batch_images,  # images one request may carry
        "input": [
            {
                "name": PIXELS,
                "data_type": "TYPE_UINT8",
                "format": "FORMAT_NCHW",
                "dims": [card.in_channels, card.height, card.width],
            }
        ],
        "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [card.num_classes]}],
        "dynamic_batching": {},
        "instance_group": [{"kind": "KIND_GPU" if provider == "CUDAExecutionProvider" else "KIND_CPU", "count": 1}],
        "parameters": {"class_names": {"string_value": json.dumps(list(card.class_names))}},
    }


# -- inference requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """An output a request asks for: the probabilities, or their top ``classification`` as strings."""

    classification: int  # 0: the probabilities themselves
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    pixels: np.ndarray | None  # uint8 [N, C, H, W], or None when images are given
    images: list[bytes] | None  # encoded images, or None
    outputs: list[Output]

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels)


def parse_infer(body: bytes, headers: dict[bytes, bytes], card, max_images: int) -> InferRequest:
    """An infer request's body (JSON, or JSON then binary tensors) as arrays, checked against the
    model's ``card``; a :class:`RequestError` that says what to fix otherwise."""
    if headers.get(b"content-encoding", b"identity").lower() != b"identity":
        # A compressed body would be inflated past every size bound the edge applied to it.
        raise UnsupportedMediaType("compressed request bodies are not accepted; send the body uncompressed")
    header, binary = _split(body, headers.get(HEADER_LENGTH))
    request = _json_object(header)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f"'inputs' must be a list of one tensor: {PIXELS!r} (UINT8) or {IMAGE!r} (BYTES)")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise RequestError(f"input {shown(name)}: 'shape' must be a list of non-negative integers, got {shape!r}")
    data = _tensor_data(tensor, binary)
    pixels, images = check_input(name, datatype, shape, data, tensor.get("parameters") or {}, card, max_images)
    return InferRequest(request_id(request.get("id")), pixels, images, requested_outputs(request, card.num_classes))


def check_input(
    name, datatype, shape: list[int], data, parameters: dict, card, max_images: int
) -> tuple[np.ndarray | None, list[bytes] | None]:
    """(pixels, None) or (None, encoded images) of the request's one input, checked against the
    model's ``card``, whichever protocol carried it: ``data`` is raw bytes, or the values of JSON
    (lists of numbers, base64 strings) or of a gRPC message (numbers, or bytes: one per image)."""
    expected = [card.in_channels, card.height, card.width]
    if name == PIXELS:
        if datatype != "UINT8" or len(shape) != 4 or shape[1:] != expected:
            raise RequestError(
                f"input {PIXELS!r} must be UINT8 [N, {', '.join(map(str, expected))}] for this model, "
                f"got {datatype} {shape}"
            )
        _check_count(shape[0], max_images)
        pixels, images = _pixels(data, shape), None
    elif name == IMAGE:
        if datatype != "BYTES" or len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
            raise RequestError(f"input {IMAGE!r} must be BYTES [N] (encoded images), got {datatype} {shape}")
        _check_count(shape[0], max_images)
        pixels, images = None, _images(data, shape[0], parameters)
    else:
        raise RequestError(
            f"unknown input {shown(name)}; send {PIXELS!r} (UINT8 [N, {', '.join(map(str, expected))}]) "
            f"or {IMAGE!r} (BYTES [N], encoded images)"
        )
    return pixels, images


def _split(body: bytes, declared: bytes | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensors): the header's length comes from Inference-Header-Content-Length."""
    if declared is None:
        if len(body) > MAX_JSON_BYTES:
            raise _json_too_large()
        return body, b""
    if not (declared.isdigit() and len(declared) <= 12 and int(declared) <= len(body)):
        raise RequestError(
            f"Inference-Header-Content-Length must be the JSON header's size in bytes, at most the body's "
            f"{len(body):,}; got {declared[:16].decode('latin-1')!r}"
        )
    length = int(declared)
    if length > MAX_JSON_BYTES:
        raise _json_too_large()
    return body[:length], body[length:]


def _json_too_large() -> RequestError:
    return RequestError(
        f"the JSON part of the request exceeds {MAX_JSON_BYTES // 2**20} MiB; send tensor data as binary "
        "(the binary tensor data extension, tritonclient's default)"
    )


def _json_object(header: bytes) -> dict:
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise RequestError(f"the request is not valid JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(f"the request must be a JSON object with 'inputs', got {type(request).__name__}")
    return request


def _tensor_data(tensor: dict, binary: bytes):
    """A tensor's ``data`` (JSON), or its bytes from the binary part."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f"input {shown(tensor.get('name'))}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise RequestError(f"{len(binary):,} bytes follow the JSON header but no input has 'binary_data_size'")
        if "data" not in tensor:
            raise RequestError(f"input {shown(tensor.get('name'))} has neither 'data' nor 'binary_data_size'")
        return tensor["data"]
    if type(size) is not int or size != len(binary):
        raise RequestError(
            f"input {shown(tensor.get('name'))}: binary_data_size is {size!r} but {len(binary):,} bytes follow "
            "the JSON header"
        )
    return binary


def _check_count(count: int, max_images: int) -> None:
    if not 1 <= count <= max_images:
        raise RequestError(f"a request carries 1 to {max_images} images (SERVING_MAX_BATCH_IMAGES), got {count}")


def _pixels(data, shape: list[int]) -> np.ndarray:
    size = math.prod(shape)  # exact: np.prod wraps around past 2**63
    if isinstance(data, bytes):
        if len(data) != size:
            raise RequestError(f"input {PIXELS!r} of shape {shape} takes {size:,} bytes, got {len(data):,}")
        return np.frombuffer(data, np.uint8).reshape(shape)
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise RequestError(f"input {PIXELS!r}: 'data' must be a flat or nested list of {size:,} integers") from None
    if values.dtype.kind not in "iu" or values.size != size:
        raise RequestError(
            f"input {PIXELS!r}: 'data' must hold {size:,} integers for shape {shape}, "
            f"got {values.size:,} values of type {values.dtype}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise RequestError(f"input {PIXELS!r}: UINT8 values are 0 to 255, got {values.min()} to {values.max()}")
    return values.astype(np.uint8).reshape(shape)


def _images(data, count: int, parameters: dict) -> list[bytes]:
    if isinstance(data, bytes):
        images = deserialize_bytes(data)
    elif isinstance(data, list) and data and all(isinstance(item, bytes) for item in data):
        images = data  # gRPC's bytes_contents: one element per image
    elif isinstance(data, list) and all(isinstance(item, str) for item in data):
        # JSON cannot carry raw bytes: images in 'data' are base64, as MLServer's content_type says.
        if parameters.get("content_type") != "base64":
            raise RequestError(
                f"input {IMAGE!r}: images in JSON 'data' must be base64 strings with parameters "
                "{'content_type': 'base64'}; or send them as binary data"
            )
        try:
            images = [base64.b64decode(item, validate=True) for item in data]
        except binascii.Error as err:
            raise RequestError(f"input {IMAGE!r}: not valid base64 ({err})") from None
    else:
        raise RequestError(f"input {IMAGE!r}: 'data' must be a list of base64 strings")
    if len(images) != count:
        raise RequestError(f"input {IMAGE!r} has shape [{count}] but carries {len(images)} images")
    return images


def deserialize_bytes(data: bytes) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise RequestError("BYTES tensor data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise RequestError(f"BYTES tensor data ends inside an element: {length:,} bytes declared")
        items.append(data[offset : offset + length])
        offset += length
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def request_id(given) -> str | None:
    """The request's id, echoed in the answer; None when it sent none."""
    if given is None:
        return None
    if not isinstance(given, str) or len(given) > ID_MAX_CHARS:
        raise RequestError(f"'id' must be a string of at most {ID_MAX_CHARS} characters")
    return given


def requested_outputs(request: dict, num_classes: int) -> list[Output]:
    """The outputs a request asks for (its "outputs", each with "parameters"), as JSON has them."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be an object")
    binary_default = parameters.get("binary_data_output", False) is True
    asked = request.get("outputs")
    if asked is None:
        return [Output(0, binary_default)]
    if not isinstance(asked, list) or not asked or not all(isinstance(o, dict) for o in asked):
        raise RequestError(f"'outputs' must be a list of objects naming {PROBABILITIES!r}")
    outputs = []
    for output in asked:
        if output.get("name") != PROBABILITIES:
            raise RequestError(f"unknown output {shown(output.get('name'))}; this model has {PROBABILITIES!r}")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise RequestError(f"output {PROBABILITIES!r}: 'parameters' must be an object")
        k = options.get("classification", 0)
        if type(k) is not int or not 0 <= k <= num_classes:
            raise RequestError(f"classification must be an integer from 1 to {num_classes}, got {k!r}")
        outputs.append(Output(k, options.get("binary_data", binary_default) is True))
    return outputs


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 66 else text[:64] + "…"


def repository_options(body: bytes) -> dict:
    """The parameters of a repository request (empty body or ``{"parameters": {...}}``); model
    configs and files sent with a load are refused: a model comes from the BentoML store only."""
    if not body.strip():
        return {}
    if len(body) > MAX_JSON_BYTES:  # parsed on the event loop, like an infer request's JSON part
        raise RequestError(f"a repository request is a small JSON object; this one has {len(body):,} bytes")
    request = _json_object(body)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be an object")
    sent = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if sent:
        raise RequestError(
            f"loading with {', '.join(sent)} is not supported: register the model in the store "
            "(python -m model_store register FILE --name NAME), then load it by name"
        )
    return {**request, **parameters}


# -- inference answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """An infer answer, encoded: JSON, or JSON then binary outputs. The edge sends it as it is."""

    data: bytes
    headers: list[tuple[bytes, bytes]]
    model: str  # the model that answered, and how many images: for the request log
    images: int


def encode_infer(request: InferRequest, probabilities: np.ndarray, name: str, version: str, class_names) -> Encoded:
    """The answer: JSON, or JSON then the binary outputs when any output asked to be binary."""
    outputs, blobs = [], []
    for output in request.outputs:
        if output.classification:
            tensor = {"name": PROBABILITIES, "datatype": "BYTES", "shape": [len(probabilities), output.classification]}
            strings = classification(probabilities, class_names, output.classification)
            if output.binary:
                blobs.append(serialize_bytes([s.encode() for row in strings for s in row]))
            else:
                tensor["data"] = [s for row in strings for s in row]
        else:
            tensor = {"name": PROBABILITIES, "datatype": "FP32", "shape": list(probabilities.shape)}
            if output.binary:
                blobs.append(probabilities.astype("<f4").tobytes())
            else:
                tensor["data"] = probabilities.ravel().tolist()
        if output.binary:
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        outputs.append(tensor)
    answer = {"model_name": name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer).encode()
    if not blobs:
        return Encoded(header, [(b"content-type", b"application/json")], name, len(probabilities))
    headers = [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(len(header)).encode())]
    return Encoded(b"".join([header, *blobs]), headers, name, len(probabilities))


def json_answer(value: list) -> Encoded:
    """A JSON answer that is not an object (the repository index is an array), for the edge to send."""
    return Encoded(json.dumps(value).encode(), [(b"content-type", b"application/json")], "", 0)


def classification(probabilities: np.ndarray, class_names, k: int) -> list[list[str]]:
    """Triton's classification extension: each row's top ``k`` as ``"score:index:label"``, best
    first, ranked by the same ``top_k`` that answers ``/classify``."""
    return [
        [f"{r['probability']!r}:{r['index']}:{r['label']}" for r in top_k(row, class_names, k)["top_k"]]
        for row in probabilities
    ]

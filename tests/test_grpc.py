"""The Open Inference Protocol over gRPC against a real `bentoml serve`, driven by the unmodified
`tritonclient.grpc` client (sync and aio), the standard health and reflection clients, and raw
channels sending what no client would."""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from benchmarks.servers import free_port
from serving.config import KEPT_MB, ServingConfig
from tests.conftest import REPO, bentoml_serve, png_bytes, run_cli, wait_until
from tests.test_service_api import metric
from tests.tolerance import PROB_ATOL, assert_ranked_as

SERVICE = "inference.GRPCInferenceService"
TOKEN = "grpc-test-token"
# The module server's message limit and budget of messages held at once: 48 calls at a time, more
# than the concurrent test's 32, and a memory bound tight enough to test
LIMIT_MB, BUDGET_MB = 2, 96


@pytest.fixture(scope="module")
def served(bentoml_home, tmp_path_factory) -> dict:
    """One server, its gRPC port known; the shipped LeNet, with model control on; messages of at
    most 2 MB, 96 MB of them at once, so that its memory bound is tight enough to test. Its worker's
    memory when it is ready, for that test."""
    grpc_port = free_port()
    log = tmp_path_factory.mktemp("grpc") / "serve.log"
    env = {
        "SERVING_GRPC_PORT": str(grpc_port),
        "SERVING_MODEL_CONTROL": "true",
        "SERVING_LOG_REQUESTS": "false",
        "SERVING_MAX_BODY_BYTES": str(LIMIT_MB * 2**20),
        "SERVING_MAX_BODY_MEMORY_MB": str(BUDGET_MB),
    }
    with bentoml_serve(bentoml_home, log, env) as url:
        worker = listener(grpc_port)
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "worker": worker, "start": worker.memory_info().rss}


def listener(port: int) -> psutil.Process:
    """The process listening on ``port``: the service worker that serves gRPC."""
    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.pid}
    return psutil.Process(pid)


def peak_rss(process: psutil.Process) -> int:
    return next(
        int(line.split()[1]) * 1024 for line in open(f"/proc/{process.pid}/status") if line.startswith("VmHWM:")
    )


def memory_bound(start: int, budget_mb: int = BUDGET_MB, limit_mb: int = LIMIT_MB) -> int:
    """README, "Limits": a worker holds at most its memory at start, what the allocator keeps
    (KEPT_MB), the body budget, and twice that again for gRPC's messages while they are parsed, with
    each call's stream window (ServingConfig.memory_bound_mb's terms)."""
    config = ServingConfig(max_body_bytes=limit_mb * 2**20, max_body_memory_mb=budget_mb)
    return start + (KEPT_MB + 3 * budget_mb) * 2**20 + 2 * config.grpc_calls * config.grpc_stream_bytes


def classify(url: str, image: bytes) -> dict:
    response = httpx.post(
        f"{url}/classify", files={"image": ("x.png", image, "image/png")}, data={"top_k": "10"}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def code_of(call) -> grpc.StatusCode:
    """The status code a tritonclient call ended in (it raises InferenceServerException)."""
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status(), raised.value.message()


def test_tritonclient_grpc_health_metadata_and_config(served):
    client = triton.InferenceServerClient(served["grpc"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fashion-lenet")
    metadata = client.get_server_metadata()
    assert metadata.name == "classic-cnns" and "classification" in metadata.extensions
    model = client.get_model_metadata("fashion-lenet", as_json=True)
    assert model["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}]
    config = client.get_model_config("fashion-lenet", as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["format"] == "FORMAT_NCHW"
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
    # the shipped models, both served; whatever else the store holds (other tests register more) is not
    assert {name for name, state in index.items() if state == "READY"} == {"fashion-lenet", "fashion-resnet20"}
    status, message = code_of(lambda: client.get_model_metadata("no-such-model"))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message


def test_tritonclient_grpc_answers_as_classify_does(served, fashion_test):
    """Encoded images (BYTES) and raw pixels (UINT8, raw_input_contents), with and without the
    classification extension: /classify's probabilities and ranking for the same images."""
    client = triton.InferenceServerClient(served["grpc"])
    images = fashion_test[0][:8]
    encoded = [png_bytes(image) for image in images]
    as_bytes = triton.InferInput("image", [len(encoded)], "BYTES")
    as_bytes.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    as_pixels = triton.InferInput("pixels", [len(images), 1, 28, 28], "UINT8")
    as_pixels.set_data_from_numpy(np.ascontiguousarray(images[:, None]))
    top = [triton.InferRequestedOutput("probabilities", class_count=3)]
    answers = [classify(served["url"], data) for data in encoded]
    for tensor in (as_bytes, as_pixels):
        result = client.infer("fashion-lenet", [tensor], request_id="r-1")
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (8, 10) and result.get_response().id == "r-1"
        ranked = client.infer("fashion-lenet", [tensor], outputs=top).as_numpy("probabilities")
        for row, strings, answer in zip(probabilities, ranked, answers):
            indices = [r["index"] for r in answer["top_k"]]
            np.testing.assert_allclose(row[indices], [r["probability"] for r in answer["top_k"]], atol=PROB_ATOL)
            assert_ranked_as(list(strings), answer["top_k"])


def test_tritonclient_grpc_aio_answers_concurrent_calls(served, fashion_test):
    images = fashion_test[0][100:132]

    async def run() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(served["grpc"])
        try:
            calls = []
            for image in images:
                tensor = triton_aio.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([png_bytes(image)], dtype=np.object_))
                calls.append(client.infer("fashion-lenet", [tensor]))
            return [result.as_numpy("probabilities")[0] for result in await asyncio.gather(*calls)]
        finally:
            await client.close()

    rows = asyncio.run(run())
    sync = triton.InferenceServerClient(served["grpc"])
    pixels = triton.InferInput("pixels", [len(images), 1, 28, 28], "UINT8")
    pixels.set_data_from_numpy(np.ascontiguousarray(images[:, None]))
    np.testing.assert_allclose(
        np.stack(rows), sync.infer("fashion-lenet", [pixels]).as_numpy("probabilities"), atol=PROB_ATOL
    )


def test_errors_are_status_codes_from_the_one_table(served, fashion_test):
    client = triton.InferenceServerClient(served["grpc"])
    broken = triton.InferInput("image", [2], "BYTES")
    broken.set_data_from_numpy(np.array([png_bytes(fashion_test[0][0]), b"not an image"], dtype=np.object_))
    status, message = code_of(lambda: client.infer("fashion-lenet", [broken]))
    assert (
        status == "StatusCode.INVALID_ARGUMENT"
        and message.startswith("image 1: ")
        and "not a supported image" in message
    )
    wrong = triton.InferInput("pixels", [1, 3, 28, 28], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.uint8))
    status, message = code_of(lambda: client.infer("fashion-lenet", [wrong]))
    assert (
        status == "StatusCode.INVALID_ARGUMENT"
        and "must be UINT8 [N, 1, 28, 28] for this model, got UINT8 [1, 3, 28, 28]" in message
    )
    status, message = code_of(lambda: client.infer("no-such-model", [wrong]))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message
    status, _ = code_of(lambda: client.load_model("no-such-model"))
    assert status == "StatusCode.NOT_FOUND"
    metrics = httpx.get(f"{served['url']}/metrics", timeout=60).text
    assert 'route="grpc:ModelInfer",status="INVALID_ARGUMENT"' in metrics
    assert 'route="grpc:ModelInfer",status="OK"' in metrics


def raw_call(target: str, method: str, payload: bytes, timeout: float = 60) -> grpc.RpcError | bytes:
    """``payload`` sent as the request of ``method``, unparsed: what no client library would send."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
        try:
            return call(payload, timeout=timeout)
        except grpc.RpcError as error:
            return error


def infer_message(shape: list[int], raw: bytes | None = None, inputs: int = 1, datatype: str = "UINT8") -> bytes:
    request = pb.ModelInferRequest(model_name="fashion-lenet")
    for _ in range(inputs):
        request.inputs.add(name="pixels", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request.SerializeToString()


@pytest.mark.parametrize(
    "payload, code, message",
    [
        (b"\xff\xfe not protobuf \x00" * 10, grpc.StatusCode.INVALID_ARGUMENT, "is no ModelInfer request message"),
        (infer_message([2**40, 1, 28, 28], b""), grpc.StatusCode.INVALID_ARGUMENT, "a request carries 1 to 64 images"),
        (infer_message([2**40], None, datatype="BYTES"), grpc.StatusCode.INVALID_ARGUMENT, "needs 1,099,511,627,776 values"),
        (infer_message([2, 1, 28, 28], b"\x00" * 100), grpc.StatusCode.INVALID_ARGUMENT, "takes 1,568 bytes, got 100"),
        (infer_message([1, 1, 28, 28], b"\x00" * 784, inputs=10_000), grpc.StatusCode.INVALID_ARGUMENT, "got 10000"),
        (infer_message([1, 1, 28, 28], b"\x00" * ((LIMIT_MB + 1) * 2**20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
    ids=["not-protobuf", "shape-2^40", "bytes-2^40", "raw-size-disagrees", "10000-inputs", "over-the-limit"],
)  # fmt: skip
def test_hostile_messages_end_in_a_status_code_and_the_server_stays_up(served, payload, code, message):
    error = raw_call(served["grpc"], "ModelInfer", payload)
    assert isinstance(error, grpc.RpcError) and error.code() == code, error
    assert message in (error.details() or "")
    client = triton.InferenceServerClient(served["grpc"])
    assert client.is_server_ready()  # and it still answers
    pixels = triton.InferInput("pixels", [1, 1, 28, 28], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
    assert client.infer("fashion-lenet", [pixels]).as_numpy("probabilities").shape == (1, 10)


def test_health_and_reflection_for_operators(served):
    with grpc.insecure_channel(served["grpc"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = reflection_pb2.ServerReflectionRequest(list_services="")
        listed = next(reflection.ServerReflectionInfo(iter([asked]), timeout=30))
        names = {service.name for service in listed.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_the_token_guards_every_method_but_the_probes(bentoml_home, tmp_path):
    grpc_port = free_port()
    env = {"SERVING_GRPC_PORT": str(grpc_port), "SERVING_AUTH_TOKEN": TOKEN, "SERVING_LOG_REQUESTS": "false"}
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env):
        target = f"127.0.0.1:{grpc_port}"
        anonymous = triton.InferenceServerClient(target)
        assert anonymous.is_server_live() and anonymous.is_server_ready()  # probes are open
        status, message = code_of(lambda: anonymous.get_model_metadata("fashion-lenet"))
        assert status == "StatusCode.UNAUTHENTICATED" and "authorization: Bearer" in message
        wrong = {"authorization": "Bearer nope"}
        status, _ = code_of(lambda: anonymous.get_model_metadata("fashion-lenet", headers=wrong))
        assert status == "StatusCode.UNAUTHENTICATED"
        right = {"authorization": f"Bearer {TOKEN}"}
        assert anonymous.get_model_metadata("fashion-lenet", headers=right).name == "fashion-lenet"
        with grpc.insecure_channel(target) as channel:  # reflection too: it describes what the token guards
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            asked = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as refused:
                next(reflection.ServerReflectionInfo(iter([asked]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:  # and a stream
                stream_raw(channel, [infer_message([1, 1, 28, 28], b"\x00" * 784)])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_open_stream_holds_one_admission_slot_for_as_long_as_it_is_open(bentoml_home, tmp_path, fashion_test):
    """With SERVING_MAX_CONCURRENCY=1, an open stream is the one request in flight, idle or not,
    however many of its messages were served: /classify is answered 503 meanwhile (the edge's own
    admission; gRPC's call limit, 1 here too, would refuse only gRPC), and 200 once it closes."""
    grpc_port = free_port()
    env = {"SERVING_GRPC_PORT": str(grpc_port), "SERVING_MAX_CONCURRENCY": "1", "SERVING_LOG_REQUESTS": "false"}
    message = infer_message([1, 1, 28, 28], b"\x00" * 784)
    image = png_bytes(fashion_test[0][0])
    with (
        bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url,
        grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        stream = channel.stream_stream(
            f"/{SERVICE}/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        more, done = queue.Queue(), object()
        first = stream(iter(more.get, done), timeout=60)
        for _ in range(3):  # three messages, one slot
            more.put(message)
            assert next(first).infer_response.model_name == "fashion-lenet"
        busy = httpx.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")}, timeout=60)
        assert busy.status_code == 503 and "Retry-After" in busy.headers, busy.text
        more.put(done)
        assert list(first) == []  # the stream ends, and frees its slot
        classify(url, image)


def test_the_shipped_generated_code_is_what_protoc_writes():
    result = run_cli("-m", "serving.protocol.generate", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (REPO / "serving/protocol/grpc_service.proto").read_text().count("service GRPCInferenceService") == 1


def pixels_input(images: np.ndarray, module=triton) -> triton.InferInput:
    tensor = module.InferInput("pixels", [len(images), 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(images[:, None]))
    return tensor


def test_tritonclient_grpc_stream_answers_as_classify_does_and_errors_in_band(served, fashion_test):
    """ModelStreamInfer with tritonclient's stream (start_stream, async_stream_infer): each
    message answered with /classify's probabilities, matched by its id; a bad message answered in
    the stream with its status code and the error table's message, and the stream goes on."""
    client = triton.InferenceServerClient(served["grpc"])
    images = fashion_test[0][200:216]
    answers = [classify(served["url"], png_bytes(image)) for image in images]
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(8):
            client.async_stream_infer("fashion-lenet", [pixels_input(images[i : i + 1])], request_id=f"m-{i}")
        wrong = triton.InferInput("pixels", [1, 3, 28, 28], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.uint8))
        client.async_stream_infer("fashion-lenet", [wrong], request_id="wrong")
        client.async_stream_infer("no-such-model", [pixels_input(images[:1])], request_id="unknown")
        for i in range(8, 16):
            client.async_stream_infer("fashion-lenet", [pixels_input(images[i : i + 1])], request_id=f"m-{i}")
        got = [results.get(timeout=60) for _ in range(18)]
    finally:
        client.stop_stream()
    errors = sorted(str(error) for _, error in got if error is not None)
    assert len(errors) == 2, errors
    assert errors[0].startswith("INVALID_ARGUMENT: ") and "must be UINT8 [N, 1, 28, 28] for this model" in errors[0]
    assert errors[1].startswith("NOT_FOUND: ") and "no-such-model" in errors[1]
    rows = {result.get_response().id: result.as_numpy("probabilities")[0] for result, error in got if error is None}
    assert sorted(rows) == sorted(f"m-{i}" for i in range(16))
    for i, answer in enumerate(answers):
        indices = [r["index"] for r in answer["top_k"]]
        np.testing.assert_allclose(rows[f"m-{i}"][indices], [r["probability"] for r in answer["top_k"]], atol=PROB_ATOL)
    metrics = httpx.get(f"{served['url']}/metrics", timeout=60).text
    assert 'route="grpc:ModelStreamInfer",status="NOT_FOUND"' in metrics


def test_tritonclient_grpc_aio_stream_answers_as_model_infer_does(served, fashion_test):
    images = fashion_test[0][300:332]

    async def run() -> dict[str, np.ndarray]:
        client = triton_aio.InferenceServerClient(served["grpc"])

        async def requests():
            for i, image in enumerate(images):
                yield {
                    "model_name": "fashion-lenet",
                    "inputs": [pixels_input(image[None], triton_aio)],
                    "request_id": str(i),
                }

        try:
            rows = {}
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                rows[result.get_response().id] = result.as_numpy("probabilities")[0]
                if len(rows) == len(images):
                    break
            return rows
        finally:
            await client.close()

    rows = asyncio.run(run())
    whole = triton.InferenceServerClient(served["grpc"]).infer("fashion-lenet", [pixels_input(images)])
    np.testing.assert_allclose(
        np.stack([rows[str(i)] for i in range(len(images))]), whole.as_numpy("probabilities"), atol=PROB_ATOL
    )


def slow_png() -> bytes:
    """A 40-megapixel RGB PNG of 135 KB (one colour, striped), 0.65 s to decode here: slow to
    answer, yet under a stream's window (an eighth of the module server's 2 MB message limit)."""
    pixels = np.full((6300, 6300, 3), 128, np.uint8)
    pixels[::7, :, 0] = 3
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_stream_s_messages_are_served_at_once_and_answered_as_they_finish(served):
    """A slow message (an image that takes 0.65 s to decode here) then a fast one (raw pixels, a
    millisecond): the fast one is answered first, so the stream did not wait for the slow one
    before reading and serving the next. Bytes that are no request are answered in the stream."""
    slow = pb.ModelInferRequest(model_name="fashion-lenet", id="slow")
    slow.inputs.add(name="image", datatype="BYTES", shape=[1])
    slow.inputs[0].contents.bytes_contents.append(slow_png())
    fast = pb.ModelInferRequest(model_name="fashion-lenet", id="fast")
    fast.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 28, 28])
    fast.raw_input_contents.append(b"\x00" * 784)
    with grpc.insecure_channel(served["grpc"]) as channel:
        stream = channel.stream_stream(
            f"/{SERVICE}/ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = [(a.infer_response.id, a.error_message) for a in stream(iter([slow, fast]), timeout=60)]
        assert answers == [("fast", ""), ("slow", "")]
        junk = stream_raw(channel, [b"\xff\xfe not protobuf \x00" * 10, fast.SerializeToString()])
    assert junk[0].error_message.startswith("INVALID_ARGUMENT: the request is no ModelStreamInfer request message")
    assert junk[1].infer_response.id == "fast"


def stream_raw(channel: grpc.Channel, messages: list[bytes]) -> list:
    """``messages`` sent as a ModelStreamInfer stream, unparsed; its answers in the order they came."""
    stream = channel.stream_stream(
        f"/{SERVICE}/ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    return list(stream(iter(messages), timeout=60))


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """An HTTP/2 frame (RFC 9113, 4.1)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


class NeverReadingStream:
    """A ModelStreamInfer stream from a client that grants no flow-control window for answers
    (SETTINGS_INITIAL_WINDOW_SIZE 0, and never a WINDOW_UPDATE), so the server cannot send it one
    byte of them: HTTP/2 by hand (RFC 9113), which no gRPC client library lets one do. It writes
    ``messages`` on a thread as fast as the server's own flow-control windows let it, and
    acknowledges the server's SETTINGS and PINGs, as a live client does; ``sent``: messages written."""

    def __init__(self, target: str, messages: list[bytes]):
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.credit = {0: 65535, 1: 65535}  # bytes the server lets us send: the connection, stream 1
        self.changed = threading.Condition()
        self.sent = 0
        headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/ModelStreamInfer"),
                   (":authority", target), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        # HPACK: each a literal without indexing, new name, no Huffman (all shorter than 127 bytes)
        block = b"".join(b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in headers)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, (4).to_bytes(2, "big") + bytes(4)))
        self.sock.sendall(frame(1, 0x4, 1, block))  # HEADERS, END_HEADERS, stream 1
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, args=(messages,), daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                buffer += chunk
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                    stream, payload = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF, buffer[9 : 9 + size]
                    buffer = buffer[9 + size :]
                    if kind == 4 and not flags & 1:  # SETTINGS: its initial window, then ACK
                        for i in range(0, len(payload), 6):
                            if int.from_bytes(payload[i : i + 2], "big") == 4:
                                with self.changed:
                                    self.credit[1] += int.from_bytes(payload[i + 2 : i + 6], "big") - 65535
                                    self.changed.notify()
                        self.sock.sendall(frame(4, 1, 0))
                    elif kind == 6 and not flags & 1:  # PING: ACK with its payload
                        self.sock.sendall(frame(6, 1, 0, payload))
                    elif kind == 8 and stream in self.credit:  # WINDOW_UPDATE
                        with self.changed:
                            self.credit[stream] += int.from_bytes(payload, "big") & 0x7FFFFFFF
                            self.changed.notify()

    def _write(self, messages: list[bytes]) -> None:
        with contextlib.suppress(OSError):  # closed by the test while the server holds it back
            for message in messages:
                data = b"\x00" + len(message).to_bytes(4, "big") + message
                with self.changed:
                    self.changed.wait_for(lambda: min(self.credit.values()) >= len(data))
                    self.credit[0] -= len(data)
                    self.credit[1] -= len(data)
                self.sock.sendall(frame(0, 0, 1, data))
                self.sent += 1

    def close(self) -> None:
        self.sock.close()
        with self.changed:
            self.credit = {0: 2**31, 1: 2**31}  # the writer's wait ends; its send fails
            self.changed.notify()


def test_a_stream_left_open_and_never_read_is_held_back_and_the_server_stays_up(served):
    """A client that writes 2,000 messages on a stream and never reads an answer: the server
    serves only a window of them (64) ahead of answers it could write, and reads no more, so
    gRPC's flow control holds the client back; meanwhile other calls are answered, and the memory
    test below checks the worker's peak. Where time is the subject: once the window is served, the
    rest get 5 s more; a server that read without bound serves all 2,000 LeNet images in well under
    a second, one that holds back never does, however slow the machine."""
    message = infer_message([1, 1, 28, 28], b"\x00" * 784)
    count = lambda: metric(served["url"], "classify_requests_total", route="grpc:ModelStreamInfer", status="OK")  # noqa: E731
    before = count()
    stream = NeverReadingStream(served["grpc"], [message] * 2000)
    try:
        wait_until(lambda: count() >= before + 64, "the stream's first 64 messages were never answered")
        client = triton.InferenceServerClient(served["grpc"])
        zeros = pixels_input(np.zeros((1, 28, 28), np.uint8))
        assert client.infer("fashion-lenet", [zeros]).as_numpy("probabilities").shape == (1, 10)
        time.sleep(5)
        served_then = count() - before
        assert served_then < 200, f"the server served {served_then:.0f} of the stream's messages, none of them read"
        assert stream.sent < 2000, "the server read every message"
    finally:
        stream.close()
    assert triton.InferenceServerClient(served["grpc"]).is_server_ready()


def test_the_client_s_deadline_ends_the_server_s_work_too(served):
    """A call whose deadline passes while the server decodes its image (:func:`slow_png`, 0.65 s
    to decode here, against a 50 ms deadline: a margin of 13 on this machine, more on
    a faster one) ends DEADLINE_EXCEEDED for the client, and the server counts it so: it stopped
    waiting for the decode then, rather than answering a call nobody waits for."""
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([slow_png()], dtype=np.object_))
    client = triton.InferenceServerClient(served["grpc"])
    before = metric(served["url"], "classify_requests_total", route="grpc:ModelInfer", status="DEADLINE_EXCEEDED")
    status, _ = code_of(lambda: client.infer("fashion-lenet", [image], client_timeout=0.05))
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(
        lambda: (
            metric(served["url"], "classify_requests_total", route="grpc:ModelInfer", status="DEADLINE_EXCEEDED")
            == before + 1
        ),
        lambda: "the server never counted the call DEADLINE_EXCEEDED",
        60,
        0.2,
    )
    assert client.is_server_ready()


def test_the_hostile_messages_left_the_worker_within_its_memory_bound(served):
    """After every hostile message above (they run first, in file order) and the other calls of
    this module's server, its worker's peak memory is within README's bound."""
    peak, bound = peak_rss(served["worker"]), memory_bound(served["start"])
    assert peak <= bound, f"peak {peak / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB"


def test_messages_at_the_limit_by_the_dozen_keep_the_worker_within_its_memory_bound(bentoml_home, tmp_path):
    """Thirty-two calls at once, each a message just under the limit, with eight messages' worth
    allowed at once: each ends in a status code, and the worker's peak memory stays within README's
    bound. Holding all 32 (256 MB, more while parsed) would exceed it, as would keeping what the
    refused calls held: ending them with context.abort did (serving.grpc_server._ended)."""
    grpc_port = free_port()
    env = {
        "SERVING_GRPC_PORT": str(grpc_port),
        "SERVING_MAX_BODY_BYTES": str(8 * 2**20),
        "SERVING_MAX_BODY_MEMORY_MB": "64",  # 8 calls at a time
        "SERVING_LOG_REQUESTS": "false",
    }
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env):
        target = f"127.0.0.1:{grpc_port}"
        worker = listener(grpc_port)
        start = worker.memory_info().rss
        payload = infer_message([1, 1, 28, 28], b"\x00" * (8 * 2**20 - 4096))
        with ThreadPoolExecutor(32) as pool:
            ended = list(pool.map(lambda _: raw_call(target, "ModelInfer", payload), range(32)))
        codes = Counter(error.code() for error in ended if isinstance(error, grpc.RpcError))
        assert sum(codes.values()) == 32, codes
        assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert triton.InferenceServerClient(target).is_server_ready()
        peak, bound = peak_rss(worker), memory_bound(start, 64, 8)
        assert peak <= bound, f"peak {peak / 2**20:.0f} MB, start {start / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB"

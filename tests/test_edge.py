"""The serving edge in process, through httpx.ASGITransport: the gate, admission, the error table,
the catch-all 500, timeouts and metrics, on the shipped ONNX graph. No server process, no sleeps:
requests that must stay in flight are held by events."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from model_store.store import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME
from serving import edge as edge_module
from serving import logs
from serving.config import ServingConfig, available_cpus
from serving.edge import CLASSIFY, CLASSIFY_BATCH, MONITOR, OPEN_PATHS, Edge
from serving.errors import HTTP_ERRORS, http_status
from serving.handlers import Handlers
from serving.model_set import ModelSet
from tests.conftest import png_bytes
from tests.tolerance import PROB_ATOL, clear_top1

TOKEN = "t0ken"


class BentoStandIn:
    """Where the edge sends what it does not answer itself (BentoML's app, in the service)."""

    def __init__(self):
        self.paths = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"bentoml"})


def make_edge(hot: bool = True, **settings) -> tuple[Edge, Handlers, BentoStandIn]:
    config = ServingConfig(**settings)
    models = ModelSet(config, [(DEFAULT_MODEL_NAME, "shipped", DEFAULT_MODEL_FILE)])
    handlers = Handlers(models, config)
    fallback = BentoStandIn()
    return Edge(fallback, config, lambda: handlers, hot=hot), handlers, fallback


def client(edge: Edge) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=edge), base_url="http://edge")


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def images(fashion_test) -> list[bytes]:
    return [png_bytes(image) for image in fashion_test[0][:16]]


def test_answers_are_the_engines_through_both_routes(images, fashion_test):
    edge, handlers, _ = make_edge()
    expected = handlers.models.default.engine.predict(fashion_test[0][:16, None])

    async def main():
        async with client(edge) as http:
            singles = [await http.post(CLASSIFY, files={"image": ("x.png", image, "image/png")}) for image in images]
            files = [("images", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
            batch = await http.post(CLASSIFY_BATCH, files=files, data={"top_k": "10"})
        return singles, batch

    singles, batch = asyncio.run(main())
    # one at a time and in a batch, against predict on all 16: float32 outputs, not the same bits
    for answer, probabilities, result, clear in zip(singles, expected, batch.json()["results"], clear_top1(expected)):
        assert answer.status_code == 200
        assert answer.json()["index"] == int(probabilities.argmax()) or not clear
        assert answer.json()["probability"] == pytest.approx(float(probabilities.max()), abs=PROB_ATOL)
        assert [r["probability"] for r in result["top_k"]] == pytest.approx(
            sorted(probabilities, reverse=True), abs=PROB_ATOL
        )


@pytest.mark.parametrize(
    "path",
    [
        CLASSIFY,
        CLASSIFY_BATCH,
        "/models",
        MONITOR,
        "/schema.json",
        "/v2/models/x/infer",
        "/a/route/added/later",
        "/static_content/../models",
    ],
)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN} ", f"Bearer  {TOKEN}"]
)
def test_with_a_token_set_every_path_but_the_open_ones_needs_it(path, authorization):
    edge, _, fallback = make_edge(auth_token=TOKEN)
    before = sample("classify_rejected_total", reason="unauthorized")
    headers = {"Authorization": authorization} if authorization else {}

    async def main():
        async with client(edge) as http:
            return await http.post(path, headers=headers, content=b"x")

    response = asyncio.run(main())
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in response.json()["error"] and fallback.paths == []
    assert sample("classify_rejected_total", reason="unauthorized") == before + 1


def test_open_paths_need_no_token_and_the_right_token_opens_the_rest(images):
    edge, _, fallback = make_edge(auth_token=TOKEN)

    async def main():
        async with client(edge) as http:
            opened = [await http.get(path) for path in sorted(OPEN_PATHS) + ["/static_content/swagger-ui.css"]]
            models = await http.get("/models", headers={"Authorization": f"Bearer {TOKEN}"})
            answer = await http.post(
                CLASSIFY,
                files={"image": ("x.png", images[0], "image/png")},
                headers={"Authorization": f"bearer {TOKEN}"},  # the scheme is case-insensitive (RFC 7235)
            )
        return opened, models, answer

    opened, models, answer = asyncio.run(main())
    assert [r.status_code for r in opened] == [299] * len(opened)  # handed to BentoML, unchecked
    assert models.status_code == 299 and answer.status_code == 200
    assert fallback.paths == [*sorted(OPEN_PATHS), "/static_content/swagger-ui.css", "/models"]


def request_scope(path: str = CLASSIFY, method: str = "POST") -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"image/png")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("edge", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }


async def call(edge: Edge, body: bytes = b"", release: asyncio.Event | None = None, scope: dict | None = None):
    """One request straight through the ASGI interface, its body held back until ``release`` is set;
    returns (status, headers, body)."""
    sent = []

    async def receive():
        if release is not None:
            await release.wait()
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await edge(scope or request_scope(), receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_past_max_concurrency_a_request_is_refused_503_until_a_slot_frees(images):
    edge, handlers, _ = make_edge(max_concurrency=2)
    before = sample("classify_rejected_total", reason="overloaded")
    classify = handlers.classify

    async def main():
        release = asyncio.Event()

        async def held_classify(request):
            await release.wait()
            return await classify(request)

        handlers.classify = held_classify
        held = [asyncio.create_task(call(edge, images[0])) for _ in range(2)]
        while edge.in_flight < 2:
            await asyncio.sleep(0)
        refused = await call(edge, images[0])
        release.set()
        return refused, await asyncio.gather(*held), await call(edge, images[0])

    refused, held, after = asyncio.run(main())
    assert refused[0] == 503 and refused[1][b"retry-after"] == b"1"
    assert "2 requests already in flight" in json.loads(refused[2])["error"]
    assert [status for status, _, _ in held] == [200, 200] and after[0] == 200 and edge.in_flight == 0
    assert sample("classify_rejected_total", reason="overloaded") == before + 1


@pytest.mark.processes
def test_a_request_past_its_deadline_is_a_504_and_the_service_recovers(images):
    # Time is the subject: the stuck request waits out the whole second; the one after it must be
    # answered within it, a few milliseconds of work, on one core or 4x slower.
    edge, handlers, _ = make_edge(timeout_s=1.0)
    model = handlers.models.default
    unblock, engine = threading.Event(), model.batcher.infer

    def stuck(batch):
        unblock.wait(60)  # until the test has its 504: the bound only keeps a broken test from hanging
        return engine(batch)

    async def main():
        try:
            return await call(edge, images[0])
        finally:
            unblock.set()  # before asyncio.run waits for the engine's thread to end

    model.batcher.infer = stuck
    status, _, body = asyncio.run(main())
    assert status == 504 and "not answered within 1 s (SERVING_TIMEOUT_S)" in json.loads(body)["error"]
    model.batcher.infer = engine
    assert asyncio.run(call(edge, images[0]))[0] == 200


def test_an_unexpected_error_is_a_500_with_an_id_that_leads_to_its_logged_traceback(images):
    edge, handlers, _ = make_edge()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs.logger.addHandler(handler)

    def broken(batch):
        raise RuntimeError("the engine broke")

    handlers.models.default.batcher.infer = broken
    before = (
        sample("classify_requests_total", route=CLASSIFY, status="500"),
        sample("classify_rejected_total", reason="internal"),
    )
    try:
        status, _, raw = asyncio.run(call(edge, images[0]))
    finally:
        logs.logger.removeHandler(handler)
    body = json.loads(raw)
    assert status == 500 and body["error"] == "internal error" and len(body["id"]) == 16
    logged = [r.msg for r in records if r.msg["event"] == "internal_error"]
    assert logged and logged[0]["id"] == body["id"] and "RuntimeError: the engine broke" in logged[0]["traceback"]
    after = (
        sample("classify_requests_total", route=CLASSIFY, status="500"),
        sample("classify_rejected_total", reason="internal"),
    )
    assert after == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(
    "kwargs, status, reason, message",
    [
        (
            {"content": b"x" * 2000, "headers": {"Content-Type": "image/png"}},
            413,
            "too_large",
            "exceeds the limit of 1,000 bytes",
        ),
        (
            {"content": b"{}", "headers": {"Content-Type": "application/json"}},
            415,
            "unsupported_type",
            "unsupported content type 'application/json'",
        ),
        (
            {"content": b"not an image", "headers": {"Content-Type": "image/png"}},
            400,
            "bad_image",
            "not a supported image",
        ),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "bad_request", "empty request body"),
        (
            {"content": b"x", "headers": {"Content-Type": "image/png"}, "params": {"model": "resnet"}},
            404,
            "unknown_model",
            "unknown model 'resnet'",
        ),
        (
            {"content": b"x", "headers": {"Content-Type": "image/png"}, "params": {"top_k": "11"}},
            400,
            "bad_request",
            "top_k must be from 1 to 10",
        ),
        *(
            (
                {"content": b"x", "headers": {"Content-Type": "image/png"}, "params": {"top_k": value}},
                400,
                "bad_request",
                f"top_k must be an integer from 1 to 10, got {value!r}",
            )
            for value in (" 3", "+3", "1_0", "\u0663", "3.0")  # int() takes all but the last
        ),
    ],
)
def test_each_client_mistake_gets_its_status_and_reason(kwargs, status, reason, message):
    edge, _, _ = make_edge(max_body_bytes=1000)
    before = (
        sample("classify_rejected_total", reason=reason),
        sample("classify_requests_total", route=CLASSIFY, status=str(status)),
    )

    async def main():
        async with client(edge) as http:
            return await http.post(CLASSIFY, **kwargs)

    response = asyncio.run(main())
    assert response.status_code == status and message in response.json()["error"]
    after = (
        sample("classify_rejected_total", reason=reason),
        sample("classify_requests_total", route=CLASSIFY, status=str(status)),
    )
    assert after == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("route, field", [(CLASSIFY, "image"), (CLASSIFY_BATCH, "images")])
@pytest.mark.parametrize("option", ["top_k", "model"])
def test_an_option_sent_as_a_file_is_named_as_such(images, route, field, option):
    edge, _, _ = make_edge()

    async def main():
        async with client(edge) as http:
            files = [(field, ("x.png", images[0], "image/png")), (option, ("o.txt", b"3", "text/plain"))]
            return await http.post(route, files=files)

    response = asyncio.run(main())
    assert (
        response.status_code == 400 and response.json()["error"] == f"field {option!r} must be a text value, not a file"
    )


def test_the_error_table_maps_subclasses_before_their_bases_and_nothing_else_to_4xx():
    for kind, status, reason in HTTP_ERRORS:
        assert http_status(kind("x")) == (status, reason)
    assert http_status(KeyError("x")) == (500, "internal") and http_status(ValueError("x")) == (500, "internal")


def test_a_client_that_hangs_up_mid_body_is_counted_not_an_error():
    edge, _, _ = make_edge()
    before = sample("classify_rejected_total", reason="disconnected")
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(edge(request_scope(), receive, send))
    assert sent[0]["status"] == 499 and sample("classify_rejected_total", reason="disconnected") == before + 1


def test_other_methods_and_tracing_mode_go_through_bentoml(images):
    edge, _, fallback = make_edge(hot=False, max_concurrency=1)
    assert asyncio.run(call(edge, images[0]))[0] == 299 and fallback.paths == [CLASSIFY]
    edge, _, fallback = make_edge()
    assert asyncio.run(call(edge, scope=request_scope(method="GET")))[0] == 299 and fallback.paths == [CLASSIFY]


@pytest.mark.parametrize(
    "path", ["/nope", "/openapi.json", "/redoc", "/docs/oauth2-redirect", "/classify/x", "/models/", "/a\x00b"]
)
def test_a_path_that_is_no_route_is_a_404_here_and_never_reaches_bentoml(path):
    # BentoML's request metrics label the raw path: a path scan would grow them without bound.
    edge, _, fallback = make_edge()
    status, _, body = asyncio.run(call(edge, scope=request_scope(path=path, method="GET")))
    error = json.loads(body)["error"]
    assert status == 404 and error.startswith("no such path; the routes are") and fallback.paths == []
    assert path not in error  # no client string is echoed


async def sink(message):
    pass


@pytest.mark.processes
def test_a_body_slower_than_the_minimum_rate_is_cut_408_and_never_holds_a_slot(images, monkeypatch):
    monkeypatch.setattr(edge_module, "BODY_GRACE_S", 0.05)
    edge, _, _ = make_edge(max_concurrency=1, min_body_rate=1000)
    before = sample("classify_rejected_total", reason="slow_body")

    async def main():
        never = asyncio.Event()  # these bodies never come
        stalled = [asyncio.create_task(call(edge, images[0], never)) for _ in range(3)]
        await asyncio.sleep(0)
        fast = await call(edge, images[0])  # the one slot is free: uploads do not hold it
        return fast, await asyncio.gather(*stalled)

    fast, stalled = asyncio.run(main())
    assert fast[0] == 200 and [status for status, _, _ in stalled] == [408] * 3
    assert json.loads(stalled[0][2])["error"].startswith("request body too slow: 0 bytes in 0.")
    assert sample("classify_rejected_total", reason="slow_body") == before + 3 and edge.body_bytes == 0


@pytest.mark.processes
def test_a_body_that_keeps_the_rate_is_read_however_many_parts_it_comes_in(images, monkeypatch):
    monkeypatch.setattr(edge_module, "BODY_GRACE_S", 0.05)
    edge, _, _ = make_edge(min_body_rate=100)
    parts = [images[0][i : i + 50] for i in range(0, len(images[0]), 50)]

    async def receive():
        # 50 bytes per 10 ms, past the grace: 5,000 bytes/s, 50 times the minimum, so it holds
        # however late the loop wakes this up on a slow or busy machine.
        await asyncio.sleep(0.01)
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(edge(request_scope(), receive, send))
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["label"]


def test_an_http_10_body_without_a_length_is_411(images):
    edge, _, _ = make_edge()
    scope = {**request_scope(), "http_version": "1.0"}
    status, _, body = asyncio.run(call(edge, images[0], scope=scope))
    assert status == 411 and "Content-Length" in json.loads(body)["error"]
    with_length = {**scope, "headers": [*scope["headers"], (b"content-length", str(len(images[0])).encode())]}
    assert asyncio.run(call(edge, images[0], scope=with_length))[0] == 200


def test_bodies_held_at_once_have_one_memory_budget_past_which_503(images):
    edge, _, _ = make_edge(max_body_bytes=2**20, max_body_memory_mb=1)
    part = b"x" * 700_000

    async def main():
        release, first = asyncio.Event(), [part]

        async def stalled():  # 700 KB in, then the rest only once released
            if first:
                return {"type": "http.request", "body": first.pop(), "more_body": True}
            await release.wait()
            return {"type": "http.request", "body": b"", "more_body": False}

        held = asyncio.create_task(edge(request_scope(), stalled, sink))
        while edge.body_bytes == 0:
            await asyncio.sleep(0)
        second = await call(edge, part)  # 700 KB more would pass the 1 MB budget
        release.set()
        await held
        return second, await call(edge, images[0])

    second, after = asyncio.run(main())
    assert second[0] == 503 and "memory budget of 1 MB (SERVING_MAX_BODY_MEMORY_MB)" in json.loads(second[2])["error"]
    assert after[0] == 200 and edge.body_bytes == 0


def test_settings_come_from_the_environment_and_a_bad_one_names_its_variable():
    config = ServingConfig.from_env(
        {
            "SERVING_MODELS": "a:latest, b:v1",
            "SERVING_TRACING": "yes",
            "SERVING_WORKERS": "2",
            "SERVING_TIMEOUT_S": "2.5",
        }
    )
    assert config.models == ("a:latest", "b:v1") and config.tracing and config.workers == 2 and config.timeout_s == 2.5
    cores = available_cpus()
    assert config.engine_threads == max(1, cores // 2) and ServingConfig(workers=cores * 2).engine_threads == 1
    assert ServingConfig(workers=2, ort_threads=3).engine_threads == 3
    for environ, message in [
        ({"SERVING_WORKERS": "0"}, "SERVING_WORKERS must be at least 1, got 0"),
        ({"SERVING_TRACING": "maybe"}, "SERVING_TRACING must be true or false, got 'maybe'"),
        ({"SERVING_DEVICE": "tpu"}, "SERVING_DEVICE must be one of auto, cpu, cuda, got 'tpu'"),
        ({"SERVING_ORT_THREADS": "-1"}, "SERVING_ORT_THREADS must be 0 or more, got -1"),
        ({"SERVING_BATCH_FILL_MS": "nan"}, "SERVING_BATCH_FILL_MS must be 0 or more, got nan"),
        ({"SERVING_GRPC_STREAM_WINDOW": "0"}, "SERVING_GRPC_STREAM_WINDOW must be at least 1, got 0"),
        ({"SERVING_TIMEOUT_S": "soon"}, "SERVING_TIMEOUT_S must be a number, got 'soon'"),
        ({"SERVING_TIMEOUT_S": "inf"}, "SERVING_TIMEOUT_S must be a positive number of seconds, got inf"),
        ({"SERVING_DECODE_TIMEOUT_S": "nan"}, "SERVING_DECODE_TIMEOUT_S must be a positive number of seconds, got nan"),
        ({"SERVING_AUTH_TOKEN": " "}, "SERVING_AUTH_TOKEN is set but blank"),
        ({"SERVING_AUTH_TOKEN": "two words"}, "SERVING_AUTH_TOKEN must be printable ASCII without spaces"),
        ({"SERVING_DECODE_THREADS": "4"}, "SERVING_DECODE_THREADS was renamed SERVING_DECODE_WORKERS"),
        ({"SERVING_MAX_BODY_MEMORY_MB": "1"}, "SERVING_MAX_BODY_MEMORY_MB \\(1\\) must hold at least one body"),
        ({"SERVING_CAPTURE_SAMPLE": "2"}, "SERVING_CAPTURE_SAMPLE must be a share between 0 and 1, got 2.0"),
        ({"SERVING_CAPTURE_RATE": "0"}, "SERVING_CAPTURE_RATE must be a positive number of captures a second"),
        ({"SERVING_CAPTURE_MAX_IMAGES": "0"}, "SERVING_CAPTURE_MAX_IMAGES must be at least 1, got 0"),
        ({"SERVING_CAPTURE": "nosuch://x/y"}, "SERVING_CAPTURE: capture store nosuch://x/y"),
        ({"SERVING_REVIEW_TOKENS": "a=b"}, "SERVING_REVIEW_TOKENS needs SERVING_AUTH_TOKEN"),
        (
            {"SERVING_AUTH_TOKEN": "t", "SERVING_REVIEW_TOKENS": "alice"},
            "SERVING_REVIEW_TOKENS must be name=token pairs",
        ),
        ({"SERVING_AUTH_TOKEN": "t", "SERVING_REVIEW_TOKENS": "a=t"}, "gives 'a' a token that another name"),
        (
            {"SERVING_AUTH_TOKEN": "t", "SERVING_REVIEW_TOKENS": "service=x"},
            "'service' is the name of SERVING_AUTH_TOKEN",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            ServingConfig.from_env(environ)


def test_models_say_their_precision(fashion_test):
    _, handlers, _ = make_edge()
    described = handlers.models.describe()["models"][0]
    assert described["precision"] == "float32" and described["name"] == DEFAULT_MODEL_NAME
    probabilities = handlers.models.default.engine.predict(fashion_test[0][:4, None])
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert list(probabilities.argmax(axis=1)) == list(fashion_test[1][:4])  # the first four are easy ones


@pytest.mark.processes
def test_request_lines_are_written_together_within_the_flush_interval(images, capsys, monkeypatch):
    # Time is the subject. A 1 s interval (0.1 s in service) is a hundred times what three requests
    # here take, on one core or 4x slower, so none can be written before the last; the test then
    # waits for the write itself, not for a fixed time.
    monkeypatch.setattr(logs, "FLUSH_S", 1.0)
    edge, _, _ = make_edge()

    async def main():
        async with client(edge) as http:
            for image in images[:3]:
                await http.post(CLASSIFY, files={"image": ("x.png", image, "image/png")})
                if image is images[0]:
                    capsys.readouterr()  # lines other tests left pending are written at this loop's first line
            during, written, deadline = capsys.readouterr().err, "", time.monotonic() + 60
            while not written and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                written = capsys.readouterr().err
            return during, written

    during, written = asyncio.run(main())
    lines = [json.loads(line) for line in written.splitlines()]
    assert during == ""  # not one write per request
    assert [(e["event"], e["status"], e["model"]) for e in lines] == [
        ("request", 200, f"{DEFAULT_MODEL_NAME}:shipped")
    ] * 3

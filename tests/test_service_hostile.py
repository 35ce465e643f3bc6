"""A hostile client against a real `bentoml serve`: crafted images, a path scan, slow uploads that
reconnect, an HTTP/1.0 body without a length, a decode that runs too long, and kill -9 of the
worker under load. The service must answer each with a 4xx (never a 500), keep serving everyone
else, keep its metrics bounded, and come back from the kill with true gauges.

The tests run in file order: the last one kills the worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import uuid

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import bentoml_serve, png_bytes
from tests.hostile import crafted, encoded

HOSTILE = {
    "SERVING_MAX_CONCURRENCY": "16",
    "SERVING_DECODE_WORKERS": "2",
    "SERVING_DECODE_TIMEOUT_S": "0.2",
    "SERVING_BATCH_WAIT_MS": "200",  # every request stays in flight a while: the kill finds some
}
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def hostile(bentoml_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    with bentoml_serve(bentoml_home, log, HOSTILE) as url:
        yield url, log


def image() -> bytes:
    return png_bytes(np.full((28, 28), 120, np.uint8))


def metric(url: str, name: str, **labels) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = rf"^{name}{{{wanted}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def decoders_of(url: str) -> tuple[int, set[int]]:
    """(the service worker's pid, its decoder processes' pids) for the server at ``url``."""
    port = int(url.rsplit(":", 1)[1])
    for process in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr.port == port and c.status == "LISTEN" for c in process.net_connections()):
                decoders = {c.pid for c in process.children() if "serving.decoders" in " ".join(c.cmdline())}
                if decoders:
                    return process.pid, decoders
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no service worker with decoders listens on {port}")


def test_crafted_images_are_400s_alone_and_in_a_batch_and_never_500s(hostile):
    url, log = hostile
    for name, data in crafted().items():
        response = httpx.post(f"{url}/classify", content=data, headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 400 and response.json()["error"].startswith("corrupt"), name
    files = [("images", ("good.png", image(), "image/png"))]
    files += [("images", (f"{name}.bin", data, "application/octet-stream")) for name, data in crafted().items()]
    batch = httpx.post(f"{url}/classify_batch", files=files, timeout=30)
    results = batch.json()["results"]
    assert batch.status_code == 200 and "label" in results[0]
    assert all(r["error"].startswith("corrupt") for r in results[1:]) and len(results) == 1 + len(crafted())
    assert metric(url, "classify_requests_total", route="/classify", status="500") == 0
    assert "internal_error" not in log.read_text()


def test_a_decode_past_its_time_limit_is_a_400_and_the_service_goes_on(hostile):
    url, _ = hostile
    worker, before = decoders_of(url)
    slow = encoded("PNG", np.zeros((6000, 6000, 3), np.uint8))  # ~0.5 s to decode; the limit is 0.2 s
    response = httpx.post(f"{url}/classify", content=slow, headers=PNG, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == "decoding took longer than 0.2 s (SERVING_DECODE_TIMEOUT_S); stopped"
    medium = encoded("PNG", np.full((400, 400), 99, np.uint8))  # decoded in a decoder process, not inline
    assert httpx.post(f"{url}/classify", content=medium, headers=PNG, timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while len((after := decoders_of(url)[1])) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(after) == 2 and len(before & after) == 1  # the slow one's process killed and replaced


def test_a_path_scan_is_answered_404_without_growing_the_metrics(hostile):
    url, _ = hostile
    before = httpx.get(f"{url}/metrics").text
    not_found = metric(url, "classify_rejected_total", reason="not_found")
    with httpx.Client(base_url=url) as client:
        statuses = {client.get(f"/scan-{uuid.uuid4().hex}/%00{i}").status_code for i in range(500)}
        statuses |= {client.get(path).status_code for path in ("/openapi.json", "/redoc", "/docs/oauth2-redirect")}
    after = httpx.get(f"{url}/metrics").text
    assert statuses == {404} and "scan-" not in after
    assert metric(url, "classify_rejected_total", reason="not_found") == not_found + 503
    assert len(after) - len(before) < 2000  # counters moved; no new series


def test_slow_uploads_that_reconnect_cannot_starve_normal_traffic(hostile):
    url, _ = hostile
    host, port = url.removeprefix("http://").split(":")
    cut_before = metric(url, "classify_rejected_total", reason="slow_body")
    stalled = (  # a body announced at 1,000 bytes that stops after 10: a dead link, or a slowloris
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
        + b"\x89PNG" * 2
    )

    async def main():
        stop = asyncio.Event()

        async def slow_client():  # reconnects as soon as the server answers and hangs up
            while not stop.is_set():
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(stalled)
                answer = await reader.read()  # to the end: the server closes after cutting a body
                assert answer.startswith(b"HTTP/1.1 408"), answer
                writer.close()

        slow = [asyncio.create_task(slow_client()) for _ in range(24)]  # more than the 16 slots
        await asyncio.sleep(1)
        normal = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            end = time.monotonic() + 8
            while time.monotonic() < end:
                normal.append((await client.post("/classify", content=image(), headers=PNG)).status_code)
        stop.set()
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        return normal

    normal = asyncio.run(main())
    assert len(normal) >= 10 and normal.count(200) / len(normal) >= 0.95, normal
    # each stalled body was cut at the 2 s grace and its client came back: 24 clients for 9 s
    assert metric(url, "classify_rejected_total", reason="slow_body") - cut_before >= 24 * 3


def test_an_http_10_post_without_a_length_is_411(hostile):
    url, _ = hostile
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /classify HTTP/1.0\r\nHost: x\r\nContent-Type: image/png\r\n\r\n" + image())
        answer = b"".join(iter(lambda: connection.recv(4096), b""))  # until the server closes
    assert answer.startswith(b"HTTP/1.1 411") and b"Content-Length" in answer


def test_a_worker_killed_under_load_comes_back_ready_without_a_stale_in_flight_gauge(hostile):
    url, _ = hostile
    worker, decoders = decoders_of(url)

    async def load_then_kill():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            load = [asyncio.create_task(client.post("/classify", content=image(), headers=PNG)) for _ in range(12)]
            deadline = time.monotonic() + 10
            while metric(url, "classify_in_flight") < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            in_flight = metric(url, "classify_in_flight")
            os.kill(worker, signal.SIGKILL)
            await asyncio.gather(*load, return_exceptions=True)
            return in_flight

    assert asyncio.run(load_then_kill()) >= 4
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 and decoders_of(url)[0] != worker:
                break
        except (httpx.TransportError, AssertionError):
            pass
        assert time.monotonic() < deadline, "the service did not come back within 120 s"
        time.sleep(0.5)
    assert httpx.post(f"{url}/classify", content=image(), headers=PNG, timeout=30).status_code == 200
    assert metric(url, "classify_in_flight") == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in decoders)

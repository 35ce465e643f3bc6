"""Shadow, canary, promote, roll back (serving.rollout), on a real `bentoml serve`: the candidates
are the shipped LeNet's graph with another card, one that agrees with it and one whose
calibration makes every answer unsure, which a canary's gate must roll back on its own."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving.errors import MethodNotAllowed, NotFound, RequestError
from serving.rollout import RolloutRoute, _start_body, route
from tests.conftest import bentoml_serve, png_bytes, run_cli, wait_until

TOKEN = "rollout-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIN_REQUESTS = 40


def test_the_routes_and_their_bodies():
    assert route("GET", "/rollout") == RolloutRoute("index")
    assert route("POST", "/rollout/fashion-lenet") == RolloutRoute("start", "fashion-lenet")
    assert route("POST", "/rollout/fashion-lenet/promote") == RolloutRoute("promote", "fashion-lenet")
    assert route("POST", "/rollout/m/rollback") == RolloutRoute("rollback", "m")
    for path in ("/rollout/m/delete", "/rollout/m/promote/x", "/rollout//promote"):
        with pytest.raises(NotFound, match="the routes are GET /rollout, POST /rollout/{model}"):
            route("POST", path)
    with pytest.raises(MethodNotAllowed, match="GET is not allowed here; this rollout route takes POST"):
        route("GET", "/rollout/m")
    assert _start_body(b'{"candidate": "m:v2"}') == ("m:v2", 0)
    assert _start_body(b'{"candidate": "m:v2", "percent": 100}') == ("m:v2", 100)
    for body, message in (
        (b"", "no candidate"),
        (b"[1]", "no candidate"),
        (b"{", "the body is not JSON"),
        (b'{"candidate": "m:v2", "percent": 101}', "percent must be a whole number from 0 to 100, got '101'"),
        (b'{"candidate": "m:v2", "percent": 5.5}', "percent must be a whole number from 0 to 100, got '5.5'"),
        (b'{"candidate": "m:v2", "percent": true}', "percent must be a whole number from 0 to 100, got 'True'"),
    ):
        with pytest.raises(RequestError, match=message):
            _start_body(body)


def changed_graph(path: Path, **calibration) -> Path:
    """The shipped LeNet's graph written to ``path`` with these fields of its calibration changed:
    another version of the same network, as a rollout's candidate."""
    import onnx

    from export.onnx_export import with_card
    from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card

    card = read_onnx_card(DEFAULT_MODEL_FILE)
    changed = dataclasses.replace(card, calibration=dataclasses.replace(card.calibration, **calibration))
    onnx.save(with_card(onnx.load(DEFAULT_MODEL_FILE), changed), path)
    return path


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> dict[str, Path]:
    """Two candidates: "agrees" (a temperature a hair different: the same classes, probabilities
    within 1e-4) and "unsure" (no confidence threshold: every answer is unsure, low_confidence)."""
    from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card

    temperature = read_onnx_card(DEFAULT_MODEL_FILE).calibration.temperature
    out = tmp_path_factory.mktemp("candidates")
    return {
        "agrees": changed_graph(out / "agrees.onnx", temperature=temperature * 1.0001),
        "unsure": changed_graph(out / "unsure.onnx", confidence_threshold=None),
    }


def register(home: Path, path: Path) -> str:
    result = run_cli(
        "-m", "model_store", "register", str(path), "--name", "fashion-lenet", env={"BENTOML_HOME": str(home)}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1]  # "registered NAME:VERSION at PATH"


def classify(url: str, image: bytes, key: str | None = None) -> dict:
    headers = {**AUTH, **({"X-Rollout-Key": key} if key else {})}
    response = httpx.post(
        f"{url}/classify", files={"image": ("x.png", image, "image/png")}, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def rollout(url: str, path: str = "", body: dict | None = None) -> httpx.Response:
    if body is None and not path:
        return httpx.get(f"{url}/rollout", headers=AUTH, timeout=60)
    return httpx.post(f"{url}/rollout/fashion-lenet{path}", json=body, headers=AUTH, timeout=300)


def metric(url: str, prefix: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=60).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


@pytest.mark.processes
def test_shadow_canary_promote_and_the_gates_and_what_a_restart_keeps(bentoml_home, candidates, fashion_test, tmp_path):
    images = [png_bytes(image) for image in fashion_test[0][:400]]
    state = tmp_path / "rollout.json"
    settings = {
        "SERVING_MODELS": "fashion-lenet",  # by name: the version a restart serves is the state file's business
        "SERVING_MODEL_CONTROL": "true",
        "SERVING_AUTH_TOKEN": TOKEN,
        "SERVING_ROLLOUT_STATE": str(state),
        "SERVING_ROLLOUT_MIN_REQUESTS": str(MIN_REQUESTS),
        "SERVING_LOG_REQUESTS": "false",
    }
    log = tmp_path / "first" / "serve.log"
    log.parent.mkdir()
    with bentoml_serve(bentoml_home, log, settings) as url:
        home = log.parent / "bentoml"  # the server's own store
        live = httpx.get(f"{url}/models", headers=AUTH, timeout=60).json()["default"]
        assert httpx.get(f"{url}/rollout", timeout=60).status_code == 401  # control needs the token
        assert rollout(url).json() == {"control": True, "rollouts": [], "ended": {}}
        assert rollout(url, "/promote").status_code == 404  # nothing to promote
        good = register(home, candidates["agrees"])
        refused = rollout(url, body={"candidate": "fashion-lenet:nope"})
        assert refused.status_code == 404 and "is not in the BentoML model store" in refused.json()["error"]
        same = rollout(url, body={"candidate": live})
        assert same.status_code == 400 and same.json()["error"] == f"{live} is the live version already"

        # Shadow: the client gets the live answer, both versions score every image.
        started = rollout(url, body={"candidate": good})
        assert started.status_code == 200 and started.json()["mode"] == "shadow", started.text
        early = rollout(url, "/promote")
        assert early.status_code == 409 and f"promotion needs {MIN_REQUESTS}" in early.json()["error"]
        cli = run_cli("-m", "serving", "rollout", "promote", "fashion-lenet", "--url", url, "--token", TOKEN)
        assert cli.returncode == 2 and cli.stderr.startswith(f"error: 409 from {url}/rollout/fashion-lenet/promote: ")
        assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
        answers = [classify(url, image) for image in images[:100]]
        assert {a["version"] for a in answers} == {live.split(":")[1]}
        shadow = wait_until(
            lambda: (r := rollout(url).json()["rollouts"][0])["scored_by_both"] == 100 and r,
            "100 images scored by both",
        )
        assert shadow["agreement_on_sure"] == 1.0 and shadow["live_sure"] == sum(not a["unsure"] for a in answers)
        unsure = sum(a["unsure"] for a in answers) / 100
        assert shadow["live"]["unsure_share"] == pytest.approx(unsure)
        assert shadow["candidate"]["unsure_share"] == pytest.approx(unsure, abs=0.02)  # a hair's other temperature
        monitor = httpx.get(f"{url}/monitor", headers=AUTH, timeout=60).json()["models"]
        assert [(m["model"], m.get("candidate_of")) for m in monitor] == [(live, None), (good, "fashion-lenet")]
        assert monitor[1]["images_seen"] == 100 and monitor[0]["rollout"]["candidate"]["tag"] == good
        assert metric(url, 'classify_rollout_answers_total{model="fashion-lenet",outcome="sure",side="candidate"}') > 0
        blocked = httpx.post(f"{url}/v2/repository/models/fashion-lenet/load", headers=AUTH, timeout=60)
        assert blocked.status_code == 409 and "has a rollout under way" in blocked.json()["error"]

        # Canary: half the requests, one client on one side.
        assert rollout(url, body={"candidate": good, "percent": 50}).json()["percent"] == 50
        keyed = {classify(url, image, key="client-7")["version"] for image in images[100:140]}
        assert len(keyed) == 1
        drawn = {classify(url, image)["version"] for image in images[140:240]}
        assert drawn == {live.split(":")[1], good.split(":")[1]}  # each side has a 2^-99 chance of none

        # Promote under load: no request fails, and answers switch to the candidate's version.
        results, stop = [], threading.Event()

        def steady_load():
            with httpx.Client(timeout=60, headers=AUTH) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = http.post(f"{url}/classify", files={"image": ("x.png", images[0], "image/png")})
                    results.append((sent, response.status_code, response.json().get("version")))

        workers = [threading.Thread(target=steady_load) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: len(results) >= 20, "20 answers before the switch")
            promoted = rollout(url, "/promote")
            switched = time.monotonic()
            wait_until(lambda: sum(sent > switched for sent, _, _ in results) >= 20, "20 answers after it")
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert promoted.status_code == 200 and promoted.json()["serving"] == good, promoted.text
        assert {status for _, status, _ in results} == {200}
        assert all(version == good.split(":")[1] for sent, _, version in results if sent > switched)
        assert httpx.get(f"{url}/models", headers=AUTH, timeout=60).json()["default"] == good

        # A broken candidate on canary rolls itself back: every answer unsure, against about a third.
        broken = register(home, candidates["unsure"])
        assert rollout(url, body={"candidate": broken, "percent": 50}).status_code == 200
        for image in images[240 : 240 + MIN_REQUESTS + 10]:
            classify(url, image)
        ended = wait_until(lambda: (r := rollout(url).json())["ended"] and not r["rollouts"] and r, "the rollback")
        last = ended["ended"]["fashion-lenet"][0]
        assert (last["candidate"], last["ended"]) == (broken, "auto_rolled_back")
        assert "unsure share 1.000 exceeds the live model's" in last["why"]
        assert {classify(url, image)["version"] for image in images[300:320]} == {good.split(":")[1]}
        assert metric(url, 'classify_rollout_events_total{event="auto_rolled_back",model="fashion-lenet"}') == 1
        # Left in shadow when the service stops: the restart resumes it.
        assert rollout(url, body={"candidate": broken}).json()["mode"] == "shadow"

    # A restart serves the promoted version, not the one registered last (the broken one), and
    # resumes the shadow; its counts start again.
    log = tmp_path / "second" / "serve.log"
    log.parent.mkdir()
    with bentoml_serve(home, log, settings) as url:
        assert httpx.get(f"{url}/models", headers=AUTH, timeout=60).json()["default"] == good
        resumed = wait_until(lambda: rollout(url).json()["rollouts"], "the shadow resumed")
        assert (resumed[0]["candidate"]["tag"], resumed[0]["mode"], resumed[0]["scored_by_both"]) == (
            broken,
            "shadow",
            0,
        )
        cli = run_cli("-m", "serving", "rollout", "rollback", "fashion-lenet", "--url", url, "--token", TOKEN)
        assert cli.returncode == 0 and json.loads(cli.stdout)["ended"] == "rolled_back", cli.stderr
        assert rollout(url).json()["rollouts"] == []


@pytest.mark.processes
def test_rollout_is_model_control(bentoml_home, candidates, tmp_path):
    """Without SERVING_MODEL_CONTROL, a rollout cannot start (403); the index still answers."""
    settings = {"SERVING_MODELS": "fashion-lenet", "SERVING_LOG_REQUESTS": "false"}
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", settings) as url:
        refused = httpx.post(f"{url}/rollout/fashion-lenet", json={"candidate": "fashion-lenet:x"}, timeout=60)
        assert refused.status_code == 403 and "SERVING_MODEL_CONTROL=true" in refused.json()["error"]
        assert httpx.get(f"{url}/rollout", timeout=60).json()["control"] is False
        assert httpx.get(f"{url}/rollout/fashion-lenet", timeout=60).status_code == 405


def test_a_state_file_that_is_not_one_stops_the_service_with_one_line(bentoml_home, tmp_path):
    """Serving unpinned versions could serve a rolled-back candidate: a damaged state file stops
    `bentoml serve` at start, naming the file."""
    state = tmp_path / "rollout.json"
    state.write_text('{"models": []}')
    env = {"BENTOML_HOME": str(bentoml_home), "SERVING_ROLLOUT_STATE": str(state)}
    result = run_cli("-m", "bentoml", "serve", "--port", "1", env=env, timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).strip() == (
        f"error: SERVING_ROLLOUT_STATE {state} is not a rollout state file: expected version 1 and a models "
        "object; move it away"
    )

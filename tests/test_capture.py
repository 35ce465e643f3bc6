"""Capture and review: a real `bentoml serve` keeps what its model was unsure of (once per content,
with what it answered), people label it through /review with their own tokens, the labelled
captures leave as an image folder that training reads as it is, a failing store costs no request,
a kill at any moment leaves every row with its image, and the same store works on a real
S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_store.captures import (
    NOT_IN_DOMAIN,
    CaptureStore,
    export_folder,
    label_rows,
    read_csv_labels,
    read_label_studio,
    review_order,
)
from model_store.errors import UsageError
from tests.conftest import bentoml_serve, png_bytes, run_cli, wait_until

TOKEN, ALICE = "service-token-1", "alice-token-2"
CLASSES = ("T-shirt/top", "Trouser")


def fake_row(sha: str, reason: str, top: float, second: float, when: float, data: bytes) -> dict:
    return {
        "sha256": sha,
        "model": "m:v1",
        "time": when,
        "reason": reason,
        "label": CLASSES[0],
        "probability": top,
        "top_k": [{"label": CLASSES[0], "probability": top}, {"label": CLASSES[1], "probability": second}],
        "ood_distance": 1.0,
        "energy": -3.0,
        "bytes": len(data),
        "ext": "png",
    }


def sha_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def exercise(store: CaptureStore, tmp_path: Path) -> None:
    """What the service, /review and the CLI do with a store, on any file system pyarrow opens."""
    images = [png_bytes(np.full((8, 8), value, np.uint8)) for value in (1, 2, 3)]
    shas = [sha_of(data) for data in images]
    specs = [("low_confidence", 0.5, 0.45), ("sample", 0.99, 0.01), ("out_of_distribution", 0.9, 0.05)]
    for when, (sha, data, (reason, top, second)) in enumerate(zip(shas, images, specs)):
        store.add("m", fake_row(sha, reason, top, second, float(when), data), data)
    assert store.models() == ["m"]
    assert [row["sha256"] for row in store.rows("m")] == shas  # oldest first
    assert store.image("m", shas[0]) == (images[0], "image/png")  # the bytes as received
    # out of distribution first, then the smallest margin
    assert [r["sha256"] for r in review_order(store.rows("m"), {})] == [shas[2], shas[0], shas[1]]
    store.add_labels("m", label_rows([shas[0]], [CLASSES[1]], "bob", CLASSES))
    store.add_labels("m", label_rows([shas[0], shas[2]], [CLASSES[0], NOT_IN_DOMAIN], "alice", CLASSES))
    labels = store.labels("m")
    assert (labels[shas[0]]["label"], labels[shas[0]]["by"]) == (CLASSES[0], "alice")  # the last one wins
    assert [r["sha256"] for r in review_order(store.rows("m"), labels)] == [shas[1]]
    written = export_folder(store, "m", tmp_path / "out")
    assert written == {CLASSES[0]: 1, NOT_IN_DOMAIN: 1}
    import pyarrow.parquet as pq

    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [(r["sha256"], r["label"]) for r in manifest] == [
        (shas[0], CLASSES[0]),
        (shas[1], None),
        (shas[2], NOT_IN_DOMAIN),
    ]
    # one folder per class, "T-shirt/top" as "T-shirt%2Ftop", not a folder inside another
    assert (tmp_path / "out" / "T-shirt%2Ftop" / f"{shas[0]}.png").read_bytes() == images[0]
    assert store.remove("m", shas[1])["sha256"] == shas[1]
    assert store.row("m", shas[1]) is None and store.image("m", shas[1]) is None
    assert store.remove("m", shas[1]) is None


def test_a_local_store_keeps_captures_labels_and_exports_them(tmp_path):
    exercise(CaptureStore(str(tmp_path / "store")), tmp_path)


def test_start_up_repair_removes_images_without_a_row_and_keeps_the_rest(tmp_path):
    store = CaptureStore(str(tmp_path / "store"))
    kept, orphan = png_bytes(np.zeros((4, 4), np.uint8)), png_bytes(np.ones((4, 4), np.uint8))
    store.add("m", fake_row(sha_of(kept), "sample", 0.9, 0.1, 0.0, kept), kept)
    store.put(store.path("m", "images", f"{sha_of(orphan)}.png"), orphan)  # a write cut before its row
    assert store.repair("m", grace_s=3600) == 0  # another replica may be between the two writes
    assert store.repair("m", grace_s=0) == 1
    assert sorted(p.name for p in (tmp_path / "store" / "m" / "images").iterdir()) == [f"{sha_of(kept)}.png"]


def test_ids_model_names_and_labels_are_checked():
    with pytest.raises(UsageError, match="not a capture id"):
        CaptureStore("/tmp").row("m", "../../etc/passwd")
    with pytest.raises(UsageError, match="not a model name"):
        CaptureStore("/tmp").rows("../m")
    with pytest.raises(
        UsageError, match="not a label of this model: 'Dress'; the labels are T-shirt/top, Trouser, not_in_domain"
    ):
        label_rows(["a" * 64], ["Dress"], "x", CLASSES)


def test_labels_import_from_csv_and_label_studio():
    sha = "ab" * 32
    assert read_csv_labels(f"path,label\nout/Trouser/{sha}.png,Trouser\n") == [(sha, "Trouser")]
    assert read_csv_labels(f"sha256,label\n{sha},not_in_domain\n") == [(sha, "not_in_domain")]
    with pytest.raises(UsageError, match="needs the columns path"):
        read_csv_labels("file,class\nx,y\n")
    # Label Studio's export of an image-classification project: uploads are renamed "<8 hex>-<name>"
    tasks = [
        {
            "data": {"image": f"/data/upload/1/1a2b3c4d-{sha}.png"},
            "annotations": [
                {"was_cancelled": False, "result": [{"type": "choices", "value": {"choices": ["Trouser"]}}]},
            ],
        },
        {"data": {"image": f"/data/upload/1/{'cd' * 32}.png"}, "annotations": [{"was_cancelled": True, "result": []}]},
    ]
    assert read_label_studio(json.dumps(tasks)) == [(sha, "Trouser")]
    with pytest.raises(UsageError, match="not Label Studio's JSON export"):
        read_label_studio("{")


@pytest.mark.processes
def test_a_kill_at_any_moment_leaves_every_row_with_its_image(tmp_path):
    """A writer killed with SIGKILL while it stores captures, five times, each once it has written
    more: every row has its image; repair then leaves every image with its row."""
    root = tmp_path / "store"
    writer = f"""
import hashlib, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from model_store.captures import CaptureStore
from tests.test_capture import fake_row
store = CaptureStore({str(root)!r})
i = int(sys.argv[1])
while True:
    data = i.to_bytes(8, "big") * 4096  # 32 KB: long enough to be cut mid-write
    store.add("m", fake_row(hashlib.sha256(data).hexdigest(), "sample", 0.9, 0.1, float(i), data), data)
    i += 1
"""
    written = 0
    for round_ in range(5):
        process = subprocess.Popen([sys.executable, "-c", writer, str(round_ * 10**6)])
        rows = root / "m" / "rows"
        wait_until(lambda: rows.is_dir() and len(os.listdir(rows)) > written + 20, "the writer to store 20 more")
        process.send_signal(signal.SIGKILL)
        process.wait()
        store = CaptureStore(str(root))
        for row in store.rows("m"):
            assert (root / "m" / "images" / f"{row['sha256']}.{row['ext']}").is_file()
        store.repair("m", grace_s=0)
        names = {p.name.split(".")[0] for p in (root / "m" / "images").iterdir()}
        assert names == {row["sha256"] for row in store.rows("m")}
        written = len(names)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a loopback port, with a bucket: a real S3-compatible HTTP server."""
    from benchmarks.servers import free_port, start, stop

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), lambda: f"moto at {url}:\n{log.read_text()[-2000:]}", 60, 0.1)
        assert httpx.put(f"{url}/captures").status_code == 200  # the bucket
        yield port
    finally:
        stop(process)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_uri(port: int, prefix: str) -> str:
    return f"s3://captures/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


@pytest.mark.processes
def test_an_s3_store_works_as_a_local_one(s3_server, tmp_path, monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    exercise(CaptureStore(s3_uri(s3_server, "unit")), tmp_path)


def post(url: str, image: bytes, token: str = TOKEN) -> dict:
    response = httpx.post(
        f"{url}/classify", files={"image": ("x.png", image, "image/png")}, headers=auth(token), timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def captured_total(url: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("classify_captured_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def dropped(url: str, reason: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("classify_capture_dropped_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.processes
def test_the_service_captures_what_it_was_unsure_of_and_people_label_it(bentoml_home, tmp_path, fashion_test):
    store_dir = tmp_path / "captures"
    env = {
        "SERVING_MODELS": "fashion-lenet:latest",
        "SERVING_CAPTURE": str(store_dir),
        "SERVING_CAPTURE_SAMPLE": "0",  # sure answers are not drawn: what is kept is the unsure ones
        "SERVING_CAPTURE_RATE": "100000",  # the rate cap is not the subject here (the writer's test has it)
        "SERVING_AUTH_TOKEN": TOKEN,
        "SERVING_REVIEW_TOKENS": f"alice={ALICE}",
        "SERVING_LOG_REQUESTS": "false",
    }
    noise = [png_bytes(a) for a in np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)]
    clothes = [png_bytes(a) for a in fashion_test[0][:40]]
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url:
        answers = [post(url, image) for image in noise + clothes]
        unsure = {sha_of(image): a for image, a in zip(noise + clothes, answers) if a["unsure"]}
        again = next(image for image, a in zip(noise, answers) if a["unsure"])
        assert post(url, again)["unsure"]  # the same content again: stored once
        assert len(unsure) >= 10  # noise is mostly out of distribution
        wait_until(lambda: captured_total(url) == len(unsure), f"{len(unsure)} captures stored")
        wait_until(lambda: dropped(url, "duplicate") == 1, "the repeated image counted once")

        # Review: a reviewer's token works on /review only, and the label records its name.
        assert httpx.get(f"{url}/review/fashion-lenet", timeout=60).status_code == 401
        assert httpx.get(f"{url}/models", headers=auth(ALICE), timeout=60).status_code == 200  # the page's start
        assert (
            httpx.post(
                f"{url}/classify", content=noise[0], headers={**auth(ALICE), "content-type": "image/png"}
            ).status_code
            == 401
        )
        queue = httpx.get(f"{url}/review/fashion-lenet?limit=500", headers=auth(ALICE), timeout=60).json()
        assert {c["id"] for c in queue["captures"]} == set(unsure) and queue["counts"]["waiting"] == len(unsure)
        for capture in queue["captures"]:
            answered = unsure[capture["id"]]
            assert (capture["reason"], capture["label"]) == (answered["unsure_reason"], answered["label"])
            assert [t["label"] for t in capture["top_k"]] == [t["label"] for t in answered["top_k"][:3]]
        reasons = [c["reason"] for c in queue["captures"]]
        assert reasons == sorted(reasons, key=lambda r: r != "out_of_distribution")  # out of distribution first
        first = queue["captures"][0]["id"]
        image = httpx.get(f"{url}/review/fashion-lenet/images/{first}", headers=auth(ALICE), timeout=60)
        assert image.status_code == 200 and sha_of(image.content) == first  # the bytes as received
        assert image.headers["content-type"] == "image/png"

        labelled = httpx.post(
            f"{url}/review/fashion-lenet/labels",
            json={"labels": [{"id": c["id"], "label": NOT_IN_DOMAIN} for c in queue["captures"][:3]]},
            headers=auth(ALICE),
            timeout=60,
        )
        assert labelled.status_code == 200 and labelled.json() == {"labelled": 3, "by": "alice"}
        for body, status, message in [
            (
                {"labels": [{"id": first, "label": "Dress?"}]},
                400,
                "not a label of this model: 'Dress?'; the labels are T-shirt/top",
            ),
            ({"labels": [{"id": "f" * 64, "label": "Dress"}]}, 404, f"no capture {'f' * 64} of model fashion-lenet"),
            ({"labels": [{"id": "../x", "label": "Dress"}]}, 400, "not a capture id"),
            ({"labels": []}, 400, "no labels"),
        ]:
            response = httpx.post(f"{url}/review/fashion-lenet/labels", json=body, headers=auth(ALICE), timeout=60)
            assert (response.status_code, message in response.json()["error"]) == (status, True), response.text
        for path, status in [
            ("/review/nope", 404),
            ("/review/fashion-lenet/images/" + "0" * 64, 404),
            ("/review/fashion-lenet/x", 404),
        ]:
            assert httpx.get(url + path, headers=auth(ALICE), timeout=60).status_code == status, path
        after = httpx.get(f"{url}/review/fashion-lenet", headers=auth(TOKEN), timeout=60).json()["counts"]
        assert (after["labelled"], after["by_label"]) == (3, {NOT_IN_DOMAIN: 3})

        gone = queue["captures"][-1]["id"]
        assert (
            httpx.delete(f"{url}/review/fashion-lenet/captures/{gone}", headers=auth(ALICE), timeout=60).status_code
            == 200
        )
        assert (
            httpx.get(f"{url}/review/fashion-lenet/images/{gone}", headers=auth(ALICE), timeout=60).status_code == 404
        )
        assert not any(p.name.startswith(gone) for p in store_dir.rglob("*"))  # its image and its row

    labels = CaptureStore(str(store_dir)).labels("fashion-lenet")
    assert {label["by"] for label in labels.values()} == {"alice"}


@pytest.mark.processes
def test_a_failing_store_costs_no_request_and_is_counted(bentoml_home, tmp_path):
    """The store is a path below a regular file: every write fails, as on a read-only or vanished
    store. No token is set here: /review then refuses to serve what clients sent."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    env = {
        "SERVING_MODELS": "fashion-lenet:latest",
        "SERVING_CAPTURE": str(blocker / "captures"),
        "SERVING_CAPTURE_RATE": "100000",
        # sure answers are not drawn: each of the 1% drawn would be one store error more than the
        # unsure answers it waits for (one CI run failed here, waiting for 15: 5 sure answers were
        # each drawn at 1%, a 5% chance a run)
        "SERVING_CAPTURE_SAMPLE": "0",
        "SERVING_LOG_REQUESTS": "false",
    }
    noise = [png_bytes(a) for a in np.random.default_rng(1).integers(0, 256, (20, 28, 28), dtype=np.uint8)]
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url:
        answers = [post(url, image) for image in noise]  # every one answered 200
        unsure = sum(a["unsure"] for a in answers)
        wait_until(lambda: dropped(url, "store_error") == unsure, f"{unsure} store errors counted")
        assert captured_total(url) == 0
        refused = httpx.get(f"{url}/review/fashion-lenet", timeout=60)
        assert refused.status_code == 403 and "only with a token" in refused.json()["error"]
        assert httpx.get(f"{url}/models", timeout=60).json()["review"] is False
    assert "capture_store_failing" in (tmp_path / "serve.log").read_text()


@pytest.mark.processes
def test_the_exported_folder_trains_as_it_is(tmp_path, bentoml_home, monkeypatch):
    """Labelled captures through the CLI (a CSV import, a label, an export), then `python -m
    training train` on the folder with the arguments a user of their own folder gives."""
    from PIL import Image

    monkeypatch.setenv("BENTOML_HOME", str(bentoml_home))
    store = CaptureStore(str(tmp_path / "store"))
    rng = np.random.default_rng(2)
    rows = []
    for i in range(24):
        data = png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8))
        store.add("fashion-lenet", fake_row(sha_of(data), "low_confidence", 0.5, 0.4, float(i), data), data)
        rows.append((sha_of(data), ("Trouser", "Bag", NOT_IN_DOMAIN)[i % 3]))
    csv = tmp_path / "labels.csv"
    csv.write_text("sha256,label\n" + "".join(f"{sha},{label}\n" for sha, label in rows[:-1]))
    cli = ["-m", "model_store", "captures"]
    where = ["--store", str(tmp_path / "store"), "--model", "fashion-lenet"]
    env = {"BENTOML_HOME": str(bentoml_home)}
    result = run_cli(*cli, "import", *where, str(csv), env=env)
    assert result.returncode == 0 and "labelled 23 captures" in result.stdout, result.stderr
    result = run_cli(*cli, "label", *where, rows[-1][0], "Pullover?", env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: not a label of this model: 'Pullover?'")
    assert "Traceback" not in result.stderr
    result = run_cli(*cli, "label", *where, rows[-1][0], rows[-1][1], "--by", "carol", env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "folder"
    result = run_cli(*cli, "export", *where, "--output", str(out), env=env)
    assert result.returncode == 0 and "wrote 24 images" in result.stdout, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Bag", "Trouser", "manifest.parquet", NOT_IN_DOMAIN]
    assert Image.open(next((out / "Bag").iterdir())).size == (28, 28)
    from training.__main__ import cli as training  # the entry point `python -m training` runs, in process

    arguments = ["train", "--dataset", "folder", "--data-dir", str(out), "--model", "lenet", "--epochs", "1"]
    assert training([*arguments, "--batch-size", "8", "--output-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    import torch

    card = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["card"]
    assert list(card["class_names"]) == ["Bag", "Trouser"]  # not_in_domain is no class


def test_the_writer_keeps_the_quota_evicting_the_oldest_unlabelled_and_the_rate_cap(tmp_path):
    """serving.capture's Capture in this process, with the shipped LeNet's real answers; its clock is
    ours, since the rate cap is about time."""
    from types import SimpleNamespace

    from model_store.engine import OnnxClassifier
    from model_store.store import DEFAULT_MODEL_FILE
    from serving.capture import Capture

    engine = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu")
    model = SimpleNamespace(name="fashion-lenet", tag="fashion-lenet:v1", engine=engine)
    noise = np.random.default_rng(3).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    rows = engine.outcomes(noise[:, None]).rows()
    images = [png_bytes(a) for a in noise]
    now = [0.0]
    store = CaptureStore(str(tmp_path / "store"))
    capture = Capture(
        store, sample=0.0, rate=1000.0, max_images=4, max_bytes=2**30, queue_bytes=2**20, clock=lambda: now[0]
    )
    try:
        for i, (image, row) in enumerate(zip(images[:3], rows)):
            capture.offer(model, image, row, "out_of_distribution")
        wait_until(lambda: len(store.rows("fashion-lenet")) == 3, "3 captures")
        first = sha_of(images[0])
        store.add_labels("fashion-lenet", label_rows([first], [NOT_IN_DOMAIN], "x", engine.card.class_names))
        capture.labelled("fashion-lenet", [first])
        for image, row in zip(images[3:7], rows[3:7]):
            capture.offer(model, image, row, "low_confidence")
        # 7 offered, 4 kept: the labelled first one, and the newest 3; the 2nd and 3rd evicted
        expected = {first, *(sha_of(image) for image in images[4:7])}
        wait_until(lambda: {r["sha256"] for r in store.rows("fashion-lenet")} == expected, "the quota kept")
        assert capture.offer(model, images[7], rows[7], None) is None  # a sure answer, not drawn: not kept
    finally:
        capture.close()
    slow = Capture(
        store, sample=1.0, rate=2.0, max_images=100, max_bytes=2**30, queue_bytes=2**20, clock=lambda: now[0]
    )
    try:
        before = len(store.rows("fashion-lenet"))
        for image, row in zip(images[7:], rows[7:]):
            slow.offer(model, image, row, None)  # 3 at one instant: a bucket of 2 takes 2
        now[0] += 0.5  # a second's half: one more token
        slow.offer(model, images[0] + b"\0", rows[0], "low_confidence")
        wait_until(lambda: len(store.rows("fashion-lenet")) == before + 3, "2 + 1 captures within the rate")
    finally:
        slow.close()
    assert len(store.rows("fashion-lenet")) == before + 3


@pytest.mark.processes
def test_a_local_store_needs_no_pyarrow_and_an_object_store_says_it_does(tmp_path):
    """The container image has no pyarrow: its captures go to a mounted folder, and an s3:// store
    is refused at start in one line."""
    script = f"""
import sys
sys.modules["pyarrow"] = sys.modules["pyarrow.fs"] = None  # as if not installed
from model_store.captures import CaptureStore
store = CaptureStore({str(tmp_path / "store")!r})
store.add("m", {{"sha256": "a" * 64, "ext": "png", "time": 1.0}}, b"x")
print(len(store.rows("m")))
from serving.config import ServingConfig
ServingConfig.from_env({{"SERVING_CAPTURE": "s3://bucket/prefix"}})
"""
    result = run_cli("-c", script)
    assert result.stdout.strip() == "1"
    assert result.returncode == 1 and result.stderr.strip().endswith(
        "ValueError: SERVING_CAPTURE: capture store s3://bucket/prefix: an object store needs pyarrow, which is not installed here"
    )

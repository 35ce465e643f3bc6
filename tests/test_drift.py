"""The OOD head and drift: the graph's distance is the kNN distance to its bank, the drift
statistics are what their definitions say, a window keeps the last answers, the shipped models'
windows stay quiet on clothes and alert on a shift, a graph without the head answers as before,
and a real `bentoml serve` reports it all on /monitor and /metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from benchmarks.ood_sets import digits
from benchmarks.streams import CORRUPTIONS, answers, replay
from export.ood_head import feature_tensor, with_reference, without_head
from model_store.drift import (
    STATISTICS,
    DriftReference,
    Gaussian,
    Window,
    class_psi,
    statistics,
)
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from serving.monitor import Monitor
from tests.conftest import bentoml_serve, png_bytes
from tests.tolerance import FIT_RTOL, NET_ATOL, NET_RTOL, decided, net_close


@pytest.fixture(scope="module")
def lenet() -> OnnxClassifier:
    return OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu")


def test_the_graph_measures_the_distance_to_the_kth_nearest_of_its_bank(lenet, fashion_test):
    proto = onnx.load(DEFAULT_MODEL_FILE)
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in proto.graph.initializer}
    bank = -weights["ood_bank_times_minus_2"].T / 2  # [M, d]: the bank as export stored it, projected
    axes, shift = weights["ood_axes"], weights["ood_shift"]  # [D, d], [d]
    k = int(weights["ood_k"][0])
    noise = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    pixels = np.concatenate([fashion_test[0][:192, None], noise])
    logits, distances, features = lenet.run(pixels, lenet.outputs)
    # the features are what the last Gemm makes the logits of
    gemm = next(node for node in proto.graph.node if node.op_type == "Gemm" and node.output[0] == "logits")
    assert gemm.input[0] == feature_tensor(proto)
    weight, bias = (weights[name] for name in gemm.input[1:])
    transposed = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    assert np.allclose(features @ (weight.T if transposed else weight) + bias, logits, atol=1e-4)
    # measured on 32 orthonormal axes (the bank's principal ones), every image alike
    assert axes.shape == (84, 32) == (features.shape[1], lenet.card.export["ood"]["dims"])
    assert np.allclose(axes.T @ axes, np.eye(32), atol=1e-5)
    projected = features.astype(np.float64) @ axes + shift
    brute = np.sqrt(((projected[:, None, :] - bank[None]) ** 2).sum(axis=2))
    expected = np.sort(brute, axis=1)[:, k - 1]
    assert k == 10 and len(bank) == lenet.card.export["ood"]["bank_images"] == 3000
    assert np.allclose(distances, expected, rtol=1e-3, atol=1e-3)
    threshold = lenet.card.calibration.knn_threshold
    assert np.mean(distances[:192] > threshold) < 0.15 and np.mean(distances[192:] > threshold) > 0.5


def test_frechet_and_psi_are_their_definitions():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mean_a, cov_a, mean_b, cov_b = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(sqrtm(cov_a @ cov_b)))
    assert Gaussian(mean_a, cov_a).frechet(mean_b, cov_b) == pytest.approx(expected, rel=1e-6)
    assert Gaussian(mean_a, cov_a).frechet(mean_a, cov_a) == pytest.approx(0, abs=1e-9)
    shares = np.array([0.5, 0.25, 0.25])
    classes = np.array([0] * 20 + [1] * 70 + [2] * 10)
    observed = (np.bincount(classes, minlength=3) + 0.5) / 101.5  # half an answer per class, never a log of 0
    assert class_psi(classes, shares) == pytest.approx(np.sum((observed - shares) * np.log(observed / shares)))
    assert class_psi(np.repeat([0, 0, 1, 2], 1000), shares) < 1e-5


def test_a_window_keeps_the_last_answers_whatever_the_batches(lenet):
    reference = lenet.drift_reference
    rng = np.random.default_rng(1)
    total = 2 * reference.window + 123
    stream = (
        rng.integers(0, 10, total),
        rng.integers(0, 3, total).astype(np.int8),
        rng.random(total).astype(np.float32),
        rng.normal(size=(total, reference.features)).astype(np.float32),
    )
    window, start = Window(reference), 0
    for size in [1, 7, 999, 64, 1, reference.window + 5, 300, 10_000]:  # sizes across and beyond the ring
        window.add(*(part[start : start + size] for part in stream))
        start = min(total, start + size)
        assert window.seen == start
    assert window.full and window.seen == total
    last = [part[-reference.window :] for part in stream]
    # The same rows, the ring's in another order: the same sums in another order. The mean OOD
    # distance is a float32 mean (a few units of float32's 6e-8); the others are float64.
    expected = statistics(window.gaussian, window.shares, *last)
    figures = window.figures()
    assert figures.pop("mean_ood_distance") == pytest.approx(expected.pop("mean_ood_distance"), rel=1e-6)
    assert figures == pytest.approx(expected, rel=FIT_RTOL)
    assert Window(reference).figures() is None  # fewer than a window's answers: no figures to compare


def test_a_drift_reference_from_a_graph_is_checked():
    reference = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu").drift_reference
    assert DriftReference.from_json(reference.to_json()) == reference
    assert sorted(reference.levels) == sorted(STATISTICS) and reference.images + reference.level_images == 6000
    for change, message in [
        ({"window": 0}, "window must be a positive integer"),
        ({"window": 10**9}, "window must be at most 100,000"),
        ({"class_shares": [0.5, 0.6]}, "class_shares must be positive shares"),
        ({"class_shares": [1.0, 0.0]}, "class_shares must be positive shares"),
        ({"feature_mean": {"a": 1}}, "feature_mean must be numbers in a regular array"),
        ({"feature_cov": [[1.0], [1.0, 2.0]]}, "feature_cov must be numbers in a regular array"),
        ({"levels": ["class_psi"]}, "levels must give a finite number for each of"),
        ({"feature_cov": [[1.0]]}, r"feature_mean \[D\] and feature_cov \[D, D\]"),
        ({"levels": {"class_psi": 1.0}}, "levels must give a finite number for each of"),
    ]:
        with pytest.raises(ValueError, match=f"drift reference: {message}"):
            DriftReference(**{**dataclasses.asdict(reference), **change})
    with pytest.raises(ValueError, match="expected the fields"):
        DriftReference.from_json('{"window": 1000}')


def test_clothes_stay_under_every_level_and_a_shift_crosses_one_within_a_window(lenet, fashion_test):
    test = [Image.fromarray(image) for image in fashion_test[0]]
    held_in = answers(lenet, test)
    rng = np.random.default_rng(2)
    calm = replay(Window(lenet.drift_reference), [(held_in, rng.integers(0, len(test), 30_000))], 100)
    assert [seen for seen, alerts, _ in calm if alerts] == []
    window = lenet.drift_reference.window
    corrupt = CORRUPTIONS["clothes, contrast halved"]
    shifts = {
        "digits": digits(),
        "noise": [Image.fromarray(a) for a in rng.integers(0, 256, (500, 28, 28), dtype=np.uint8)],
        "low contrast": [corrupt(image) for image in test[:1000]],
    }
    for name, images in shifts.items():
        shifted = answers(lenet, images)
        stream = [(held_in, rng.integers(0, len(test), 2000)), (shifted, rng.integers(0, len(images), window))]
        looks = replay(Window(lenet.drift_reference), stream, 50)
        assert not any(alerts for seen, alerts, _ in looks if seen <= 2000), name
        assert any(alerts for seen, alerts, _ in looks if seen > 2000), f"{name}: no alert in {window} images"


@pytest.fixture(scope="module")
def energy_only(tmp_path_factory) -> str:
    """The shipped graph as export wrote it before the OOD head: no kNN threshold, no drift reference."""
    card = read_onnx_card(DEFAULT_MODEL_FILE)
    old = dataclasses.replace(card, calibration=dataclasses.replace(card.calibration, knn_threshold=None))
    proto = with_reference(without_head(onnx.load(DEFAULT_MODEL_FILE)), old, None)
    path = tmp_path_factory.mktemp("energy-only") / "lenet.onnx"
    onnx.save(proto, path)
    return str(path)


def test_a_graph_without_the_head_is_judged_by_its_energy_and_not_monitored(energy_only, fashion_test):
    engine = OnnxClassifier(energy_only, device="cpu")
    assert not engine.has_ood and engine.drift_reference is None
    pixels = np.concatenate(
        [fashion_test[0][:64, None], np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)]
    )
    outcomes = engine.outcomes(pixels)
    assert outcomes.distances is None and outcomes.features is None
    calibration = engine.card.calibration
    flagged = calibration.unsure_reasons(outcomes.probabilities.max(axis=1), outcomes.energies) == "out_of_distribution"
    assert flagged.tolist() == (outcomes.energies.astype(float) > calibration.energy_threshold).tolist()
    monitor = Monitor("old", engine)
    assert len(monitor.score(pixels)) == 128  # answered as before ...
    described = monitor.describe("old:v1")
    assert described["monitored"] is False and "no drift reference" in described["reason"]  # ... and said


# Levels that count decisions (an argmax, a threshold) move by a share of one answer in a window
# when one image's decision flips on another CPU; the others are smooth in the network's outputs.
DECISION_STATISTICS = ("out_of_distribution_share", "low_confidence_share", "class_psi")


def assert_same_reference(again: DriftReference, shipped: DriftReference) -> None:
    """The same drift reference as fitted on another CPU: counts exact, fitted floats within tolerance."""
    assert (again.window, again.images, again.level_images) == (shipped.window, shipped.images, shipped.level_images)
    # a share moves by 1/images for each held-out image whose argmax is a near-tie
    assert np.allclose(again.class_shares, shipped.class_shares, rtol=0, atol=2 / shipped.images)
    assert net_close(again.feature_mean, shipped.feature_mean)
    cov, shipped_cov = np.array(again.feature_cov), np.array(shipped.feature_cov)
    assert np.allclose(cov, shipped_cov, rtol=NET_RTOL, atol=NET_ATOL * np.abs(shipped_cov).max())
    assert again.levels.keys() == shipped.levels.keys()
    for name, level in shipped.levels.items():
        flips = 2 / shipped.window if name in DECISION_STATISTICS else 0.0
        assert again.levels[name] == pytest.approx(level, rel=NET_RTOL, abs=flips), name


def test_the_retrofit_reproduces_the_shipped_head(energy_only, tmp_path, fashion_test):
    """Fitted again here, on whatever CPU this is: the same card and outputs, levels and threshold
    within float tolerance (tests/tolerance.py), and the same decisions wherever one is not a tie."""
    from tests.conftest import run_cli

    out = tmp_path / "headed.onnx"
    result = run_cli("-m", "export.ood_head", "--onnx", energy_only, "--output", str(out))
    assert result.returncode == 0, result.stderr
    shipped, again = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu"), OnnxClassifier(out, device="cpu")
    assert again.outputs == shipped.outputs

    def fitted_apart(card):  # the card less the two figures the fit computes
        ood = {k: v for k, v in card.export["ood"].items() if k != "test_flagged"}
        calibration = dataclasses.replace(card.calibration, knn_threshold=None)
        return dataclasses.replace(card, calibration=calibration, export={**card.export, "ood": ood})

    assert fitted_apart(again.card) == fitted_apart(shipped.card)
    threshold = shipped.card.calibration.knn_threshold
    assert again.card.calibration.knn_threshold == pytest.approx(threshold, rel=NET_RTOL)
    # the share of 10,000 test images over the threshold: a tie may flip, a few images at most
    assert again.card.export["ood"]["test_flagged"] == pytest.approx(
        shipped.card.export["ood"]["test_flagged"], abs=3e-4
    )
    assert_same_reference(again.drift_reference, shipped.drift_reference)

    pixels = fashion_test[0][:2000, None]
    (logits, distances, features), (logits_0, distances_0, features_0) = (
        engine.run(pixels, engine.outputs) for engine in (again, shipped)
    )
    assert np.array_equal(logits, logits_0) and np.array_equal(features, features_0)  # the same network, untouched
    assert net_close(distances, distances_0)
    clear = decided(distances_0, threshold)
    assert clear.mean() > 0.99  # the comparison below is about nearly every image
    assert np.array_equal(distances[clear] > threshold, distances_0[clear] > threshold)

    twice = run_cli("-m", "export.ood_head", "--onnx", str(out), "--output", str(tmp_path / "twice.onnx"))
    assert twice.returncode == 2 and "has an OOD head already" in twice.stderr and "Traceback" not in twice.stderr


def post_batch(url: str, images: np.ndarray) -> None:
    for start in range(0, len(images), 64):
        files = [
            ("images", (f"{i}.png", png_bytes(image), "image/png"))
            for i, image in enumerate(images[start : start + 64])
        ]
        response = httpx.post(f"{url}/classify_batch", files=files, timeout=120)
        assert response.status_code == 200, response.text


def drift_metrics(url: str) -> dict[tuple[str, str], float]:
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(("classify_drift{", "classify_drift_level{")):
            name, value = line.rsplit(" ", 1)
            statistic = name.split('statistic="')[1].split('"')[0]
            found[(name.split("{")[0], statistic)] = float(value)
    return found


@pytest.mark.processes
def test_the_service_watches_its_inputs_and_says_when_they_drift(bentoml_home, tmp_path, fashion_test):
    env = {"SERVING_MODELS": "fashion-lenet:latest", "SERVING_LOG_REQUESTS": "false"}
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url:
        before = httpx.get(f"{url}/monitor", timeout=60).json()["models"][0]
        assert before["monitored"] and before["figures"] is None and before["images_seen"] == 0
        levels = before["levels"]
        assert sorted(levels) == sorted(STATISTICS)
        post_batch(url, fashion_test[0][:1024])
        calm = httpx.get(f"{url}/monitor", timeout=60).json()["models"][0]
        assert calm["images_seen"] == 1024 and calm["alerts"] == []
        assert all(0 <= calm["figures"][s] < levels[s] for s in STATISTICS)
        gauges = drift_metrics(url)  # /monitor set the gauges to what it answered
        for statistic in STATISTICS:
            assert gauges[("classify_drift", statistic)] == pytest.approx(calm["figures"][statistic])
            assert gauges[("classify_drift_level", statistic)] == pytest.approx(levels[statistic])
        post_batch(url, np.random.default_rng(0).integers(0, 256, (512, 28, 28), dtype=np.uint8))
        shifted = httpx.get(f"{url}/monitor", timeout=60).json()["models"][0]
        assert {"out_of_distribution_share", "mean_ood_distance"} <= set(shifted["alerts"])
        assert drift_metrics(url)[("classify_drift", "mean_ood_distance")] > levels["mean_ood_distance"]
        assert shifted["history"] and shifted["history"][0]["images"] >= calm["window"]


def test_the_example_alert_rule_compares_the_gauges_the_service_exports():
    import yaml

    from serving import metrics

    rules = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "prometheus-rules.yaml").read_text())
    (rule,) = rules["groups"][0]["rules"]
    expr = " ".join(rule["expr"].split())
    drift, level = (gauge._name for gauge in (metrics.drift, metrics.drift_level))
    assert expr == f"max by (model, statistic) ({drift}) > on (model, statistic) max by (model, statistic) ({level})"
    assert set(metrics.drift._labelnames) == set(metrics.drift_level._labelnames) == {"model", "statistic"}
    assert rule["alert"] and rule["for"] and rule["labels"]["severity"]


@pytest.mark.parametrize(
    "onnx_arg, message",
    [("missing.onnx", "does not exist"), ("README.md", "is not a loadable ONNX model")],
)
def test_the_retrofit_refuses_a_file_that_is_no_graph_in_one_line(tmp_path, onnx_arg, message):
    from tests.conftest import run_cli

    path = Path(__file__).parents[1] / onnx_arg if onnx_arg == "README.md" else tmp_path / onnx_arg
    result = run_cli("-m", "export.ood_head", "--onnx", str(path), "--output", str(tmp_path / "out.onnx"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()

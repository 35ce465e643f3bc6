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
    LEVEL_TAIL,
    OUT_OF_DISTRIBUTION,
    SHARES,
    STATISTICS,
    DriftReference,
    Gaussian,
    Window,
    class_psi,
    fit_all_levels,
    fit_reference,
    share_level,
    statistics,
    window_statistics,
)
from model_store.engine import OnnxClassifier
from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from serving.monitor import UNKNOWN, Monitor
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


def random_answers(reference: DriftReference, total: int, seed: int) -> tuple[np.ndarray, ...]:
    """``total`` made-up answers as a window stores them: classes, reason codes, distances, features."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 10, total),
        rng.integers(0, 3, total).astype(np.int8),
        rng.random(total).astype(np.float32),
        rng.normal(size=(total, reference.features)).astype(np.float32),
    )


def assert_figures(figures: dict[str, float], expected: dict[str, float]) -> None:
    """The same statistics of the same rows, summed in another order. The mean OOD distance is a
    float32 mean (a few units of float32's 6e-8); the others are float64."""
    figures, expected = dict(figures), dict(expected)
    assert figures.pop("mean_ood_distance") == pytest.approx(expected.pop("mean_ood_distance"), rel=1e-6)
    assert figures == pytest.approx(expected, rel=FIT_RTOL)


def test_a_window_keeps_the_last_answers_whatever_the_batches(lenet):
    reference = lenet.drift_reference
    total = 2 * reference.window + 123
    stream = random_answers(reference, total, seed=1)
    window, start = Window(reference), 0
    for size in [1, 7, 999, 64, 1, reference.window + 5, 300, 10_000]:  # sizes across and beyond the ring
        window.add(*(part[start : start + size] for part in stream))
        start = min(total, start + size)
        assert window.seen == start
    assert window.full and window.seen == total
    last = [part[-reference.window :] for part in stream]
    reading = window.read()  # the same rows, the ring's in another order
    assert_figures(reading.figures, statistics(window.gaussian, window.shares, *last))
    assert (reading.answers, reading.level_answers, reading.levels) == (reference.window,) * 2 + (reference.levels,)


def test_the_level_fit_s_batched_statistics_are_the_window_s(lenet):
    reference = lenet.drift_reference
    window = Window(reference)
    windows = [random_answers(reference, 300, seed=s) for s in range(4)]
    classes, _, distances, features = (np.stack(parts) for parts in zip(*windows))
    batched = window_statistics(window.gaussian, window.shares, classes, distances, features.astype(np.float64))
    for i, stream in enumerate(windows):
        one = statistics(window.gaussian, window.shares, *stream)
        assert_figures({name: batched[name][i] for name in batched}, {name: one[name] for name in batched})


def test_a_filling_window_is_judged_from_its_minimum_against_the_levels_for_as_many(lenet):
    reference = lenet.drift_reference
    assert reference.minimum_answers == 100 and sorted(reference.early_levels, key=int) == ["100", "300"]
    stream = random_answers(reference, reference.window, seed=3)
    window, fed = Window(reference), 0
    expected_levels = {99: None, 100: "100", 299: "100", 300: "300", 999: "300", 1000: None}
    for count, fitted in expected_levels.items():
        window.add(*(part[fed:count] for part in stream))
        fed = count
        reading = window.read()
        if count < 100:  # no level was fitted for so few: no figures, not a 0
            assert reading is None
            continue
        assert reading.answers == count
        levels = reference.early_levels[fitted] if fitted else reference.levels
        assert reading.level_answers == (int(fitted) if fitted else reference.window) and reading.levels == levels
        # over the answers held, not the ring's empty rows
        figures, direct = (
            dict(reading.figures),
            statistics(window.gaussian, window.shares, *(p[:count] for p in stream)),
        )
        assert figures.pop("mean_ood_distance") == pytest.approx(direct.pop("mean_ood_distance"), rel=1e-6)
        assert figures == pytest.approx(direct, rel=FIT_RTOL)
        assert reading.alerts == [s for s in STATISTICS if reading.figures[s] > levels[s]]
    # the levels fall as the window fills: a partial window is never judged more harshly than a full one
    for statistic in STATISTICS:
        ladder = [reference.early_levels["100"], reference.early_levels["300"], reference.levels]
        assert [levels[statistic] for levels in ladder] == sorted((lv[statistic] for lv in ladder), reverse=True)


def test_a_share_s_level_is_the_binomial_tail_of_its_rates():
    from scipy.stats import binom

    for rate, window in [(0.05, 100), (0.05, 1000), (0.3, 300), (0.0005, 1000)]:
        # one rate: the fewest answers k whose binomial tail P(X > k) is at most LEVEL_TAIL
        fewest = next(k for k in range(window + 1) if binom.sf(k, window, rate) <= LEVEL_TAIL)
        assert share_level(np.full(50, rate), window) == fewest / window
    # several: the tail averaged over them, here a half of each
    k = next(k for k in range(101) if (binom.sf(k, 100, 0.02) + binom.sf(k, 100, 0.1)) / 2 <= LEVEL_TAIL)
    assert share_level(np.array([0.02, 0.1] * 5), 100) == k / 100


def test_a_share_s_level_no_window_could_exceed_is_clamped_and_said():
    rng = np.random.default_rng(4)
    count, features = 400, rng.normal(size=(400, 8))
    classes = rng.integers(0, 4, count)
    shares, gaussian = fit_reference(classes, features, 4)
    every_one_unsure = np.full(count, OUT_OF_DISTRIBUTION, np.int8)
    answers = (classes, every_one_unsure, rng.random(count), features)
    levels, early, clamps = fit_all_levels(shares, gaussian, answers, 1000)
    assert sorted(early) == ["100", "300"]
    assert {(c.answers, c.statistic) for c in clamps} == {(n, "out_of_distribution_share") for n in (100, 300, 1000)}
    for c in clamps:
        assert c.fitted >= 1 and c.level == 1 - 1 / c.answers
    for size, fitted in [(1000, levels), *((int(n), lv) for n, lv in early.items())]:
        assert all(fitted[name] < 1 for name in SHARES)
        assert fitted["out_of_distribution_share"] == 1 - 1 / size  # a window of nothing but those still alerts


def test_export_says_when_the_levels_rest_on_too_few_held_out_images(energy_only, capsys, fashion_test):
    """As a 3,000-image folder's 10% split would be: 271 held-out images, 136 of them for the levels."""
    from export.ood_head import fit

    images = fashion_test[0][:, None]
    card = read_onnx_card(energy_only)
    _, _, reference = fit(onnx.load(energy_only), card, images[:271], images[271:1271])
    out = capsys.readouterr().out
    assert reference.level_images == 136 and reference.images == 135
    assert (
        "warning: the drift levels were fitted on 136 held-out images, fewer than the 1,000 answers of a window" in out
    )
    assert "Hold out at least 2,000 images" in out
    for levels in [reference.levels, *reference.early_levels.values()]:
        assert all(0 < levels[name] < 1 for name in SHARES)  # a share's level a window can exceed
    # with 3,000 for the levels, no warning: test_the_retrofit_reproduces_the_shipped_head


def test_a_drift_reference_from_a_graph_is_checked():
    reference = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu").drift_reference
    assert DriftReference.from_json(reference.to_json()) == reference
    assert sorted(reference.levels) == sorted(STATISTICS) and reference.images + reference.level_images == 6000
    # a graph exported before the early levels: judged once its window is full, as it was
    older = {k: v for k, v in dataclasses.asdict(reference).items() if k != "early_levels"}
    old = DriftReference.from_json(__import__("json").dumps(older))
    assert old.early_levels == {} and old.minimum_answers == old.window and old.levels_for(999) is None
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
        ({"early_levels": {"1000": reference.levels}}, "early_levels must map counts of answers under the window"),
        ({"early_levels": {"0": reference.levels}}, "early_levels must map counts of answers under the window"),
        ({"early_levels": {"²": reference.levels}}, "early_levels must map counts of answers under the window"),
        ({"early_levels": {"100": {"class_psi": 1.0}}}, "early_levels must map counts of answers under the window"),
        ({"early_levels": [["100", reference.levels]]}, "early_levels must map counts of answers under the window"),
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
    assert again.early_levels.keys() == shipped.early_levels.keys()
    fitted = [(shipped.window, again.levels, shipped.levels)]
    fitted += [(int(n), again.early_levels[n], levels) for n, levels in shipped.early_levels.items()]
    for size, levels, shipped_levels in fitted:
        assert levels.keys() == shipped_levels.keys()
        for name, level in shipped_levels.items():
            flips = 2 / size if name in DECISION_STATISTICS else 0.0  # a share's level is a count of answers
            assert levels[name] == pytest.approx(level, rel=NET_RTOL, abs=flips), (size, name)


def test_the_retrofit_reproduces_the_shipped_head(energy_only, tmp_path, fashion_test):
    """Fitted again here, on whatever CPU this is: the same card and outputs, levels and threshold
    within float tolerance (tests/tolerance.py), and the same decisions wherever one is not a tie."""
    from tests.conftest import run_cli

    out = tmp_path / "headed.onnx"
    result = run_cli("-m", "export.ood_head", "--onnx", energy_only, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout  # 3,000 held-out images for the levels: enough
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
    """The drift gauges of /metrics: (gauge, statistic or "") -> value; a gauge with no sample is absent."""
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(("classify_drift{", "classify_drift_level{", "classify_drift_answers{")):
            name, value = line.rsplit(" ", 1)
            statistic = name.split('statistic="')[1].split('"')[0] if "statistic=" in name else ""
            found[(name.split("{")[0], statistic)] = float(value)
    return found


@pytest.mark.processes
def test_the_service_watches_its_inputs_and_says_when_they_drift(bentoml_home, tmp_path, fashion_test):
    env = {"SERVING_MODELS": "fashion-lenet:latest", "SERVING_LOG_REQUESTS": "false", "SERVING_MODEL_CONTROL": "true"}
    noise = np.random.default_rng(0).integers(0, 256, (640, 28, 28), dtype=np.uint8)
    reference = OnnxClassifier(DEFAULT_MODEL_FILE, device="cpu").drift_reference
    early = reference.early_levels[str(reference.minimum_answers)]

    def monitor() -> dict:
        return httpx.get(f"{url}/monitor", timeout=60).json()["models"][0]

    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url:
        before = monitor()
        assert before["monitored"] and before["figures"] is None and before["images_seen"] == 0
        assert before["minimum_answers"] == 100 and before["level_images"] == reference.level_images
        assert (before["level_answers"], before["levels"]) == (100, early)  # what the first figures will face
        assert drift_metrics(url) == {}  # not known yet: no sample at all, never a 0.0

        # Wrong images from the first request: under 100 answers, still nothing; from 100, an alert.
        post_batch(url, noise[:64])
        filling = monitor()
        assert filling["answers"] == 64 and filling["figures"] is None and drift_metrics(url) == {}
        post_batch(url, noise[64:128])
        early_alert = monitor()
        assert early_alert["answers"] == 128 and (early_alert["level_answers"], early_alert["levels"]) == (100, early)
        assert early_alert["figures"]["out_of_distribution_share"] > 0.5  # noise: most of it out of distribution
        assert {"out_of_distribution_share", "mean_ood_distance"} <= set(early_alert["alerts"])
        gauges = drift_metrics(url)  # /monitor set the gauges to what it answered
        assert gauges[("classify_drift_answers", "")] == 128
        for statistic in STATISTICS:
            assert gauges[("classify_drift", statistic)] == pytest.approx(early_alert["figures"][statistic])
            assert gauges[("classify_drift_level", statistic)] == pytest.approx(early[statistic])

        # A full window of clothes: quiet, judged against the full window's levels.
        post_batch(url, fashion_test[0][:1024])
        calm = monitor()
        assert calm["images_seen"] == 1152 and calm["answers"] == calm["window"] == 1000 and calm["alerts"] == []
        assert (calm["level_answers"], calm["levels"]) == (1000, reference.levels)
        assert all(0 <= calm["figures"][s] < reference.levels[s] for s in STATISTICS)
        post_batch(url, noise[128:])
        shifted = monitor()
        assert {"out_of_distribution_share", "mean_ood_distance"} <= set(shifted["alerts"])
        assert drift_metrics(url)[("classify_drift", "mean_ood_distance")] > reference.levels["mean_ood_distance"]
        assert shifted["history"] and shifted["history"][0]["answers"] == 128  # the first point: the early alert

        # The same model loaded again: the new version's window is empty, its figures not known yet.
        loaded = httpx.post(f"{url}/v2/repository/models/fashion-lenet/load", timeout=300)
        assert loaded.status_code == 200, loaded.text
        assert monitor()["figures"] is None
        gauges = drift_metrics(url)
        assert all(gauges[("classify_drift", s)] == UNKNOWN for s in STATISTICS)
        assert gauges[("classify_drift_answers", "")] == 0


RULES = Path(__file__).parents[1] / "deploy" / "prometheus-rules.yaml"


def test_the_example_alert_rule_compares_the_gauges_the_service_exports():
    import yaml

    from serving import metrics

    (rule,) = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    expr = " ".join(rule["expr"].split())
    drift, level = (gauge._name for gauge in (metrics.drift, metrics.drift_level))
    assert expr == f"max by (model, statistic) ({drift}) > on (model, statistic) max by (model, statistic) ({level})"
    assert set(metrics.drift._labelnames) == set(metrics.drift_level._labelnames) == {"model", "statistic"}
    assert rule["alert"] and rule["for"] and rule["labels"]["severity"]


@pytest.mark.processes
def test_the_alert_rule_fires_on_a_known_figure_above_its_level_and_never_on_an_unknown_one(tmp_path):
    """The shipped rule file through Prometheus's own evaluator (promtool, Debian's prometheus
    package; make test installs it): series as pods of the service export them."""
    import subprocess

    import yaml

    from serving.monitor import UNKNOWN

    (rule,) = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]

    def fired(model: str, statistic: str, value: float) -> dict:
        def render(text: str) -> str:  # the two templates the annotations use, as Go renders these values
            text = text.replace("{{ $labels.model }}", model).replace("{{ $labels.statistic }}", statistic)
            return text.replace('{{ $value | printf "%.3g" }}', f"{value:.3g}")

        return {
            "exp_labels": {**rule["labels"], "model": model, "statistic": statistic},
            "exp_annotations": {name: render(text) for name, text in rule["annotations"].items()},
        }

    ood = "out_of_distribution_share"
    series = {
        # a window of 100 answers, 99% out of distribution, against the level for 100 answers
        ("early", ood, "a"): ("0.99x10", "0.23x10"),
        # a pod whose figures are not known (its version was replaced) beside one whose are
        ("replaced", ood, "a"): (f"{UNKNOWN}x10", "0.105x10"),
        ("replaced", ood, "b"): ("0.2x10", "0.105x10"),
        # not known on its only pod, or no figure yet at all (a level only): nothing may fire
        ("unknown", ood, "a"): (f"{UNKNOWN}x10", "0.105x10"),
        ("filling", ood, "a"): (None, "0.23x10"),
        # under its level on every pod
        ("calm", "class_psi", "a"): ("0.05x10", "0.27x10"),
        ("calm", "class_psi", "b"): ("0.2x10", "0.27x10"),
    }
    input_series = []
    for (model, statistic, pod), (figure, level) in series.items():
        labels = f'model="{model}",statistic="{statistic}",pod="{pod}"'
        for name, values in (("classify_drift", figure), ("classify_drift_level", level)):
            if values is not None:
                input_series.append({"series": f"{name}{{{labels}}}", "values": values})
    alert = rule["alert"]
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": alert, "exp_alerts": []},  # pending: `for` holds it
                    {
                        "eval_time": "5m",
                        "alertname": alert,
                        "exp_alerts": [fired("early", ood, 0.99), fired("replaced", ood, 0.2)],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "rules-test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


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

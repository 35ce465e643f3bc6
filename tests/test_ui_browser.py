"""GET /ui in a real browser: headless Chromium driven by Selenium against a real `bentoml serve`.

Debian's chromium and chromedriver (`make browser`) are used by their paths, so Selenium never looks
for a driver on the network. Missing, they fail the test under CI and skip it only on a dev box.
``UI_SCREENSHOT=docs/ui.png`` makes the first test write the README's screenshot there.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, bentoml_serve, png_bytes, run_cli

TOKEN = "ui-test-token"
WAIT_S = 30


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"{what} within {WAIT_S} s")


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text  # "" while hidden


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "image").send_keys(str(path))


def open_page(driver, url: str) -> None:
    driver.get(f"{url}/ui")
    wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete", "the page loaded")


def classify(url: str, path: Path, headers: dict | None = None, **form) -> httpx.Response:
    files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
    return httpx.post(f"{url}/classify", files=files, data=form, headers=headers, timeout=30)


# What the page shows for each (unsure, unsure_reason) an answer can carry.
SURENESS = {
    (None, None): "no calibration: this model cannot say when it is unsure",
    (False, None): "sure (calibrated)",
    (True, "low_confidence"): "unsure: low confidence",
    (True, "out_of_distribution"): "unsure: not like the images this model was trained on",
}


def test_the_page_shows_what_the_api_answers_for_a_real_image(browser, server, fashion_test, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = httpx.get(f"{server}/ui", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src 'self' blob: data:" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-cache"
    listed = httpx.get(f"{server}/models", timeout=60).json()

    images, _ = fashion_test
    shoe = tmp_path / "sneaker.png"  # test image 12, a sneaker the default model is unsure of: three bars to see
    shoe.write_bytes(png_bytes(images[12]))
    expected = classify(server, shoe).json()

    browser.get_log("browser")  # drop what earlier pages logged
    open_page(browser, server)
    models = Select(browser.find_element(By.ID, "model"))
    wait_for(browser, lambda d: len(models.options) == len(listed["models"]), "every model listed")
    assert models.first_selected_option.get_attribute("value") == listed["default"]
    card = text(browser, "card-fields")
    accuracy = next(m for m in listed["models"] if m["default"])["card"]["metrics"]["test_acc"]
    assert f"test accuracy\n{100 * accuracy:.2f} %" in card and "28 × 28 px" in card and "1 (grayscale)" in card
    assert "precision\nfloat32" in card and "Ankle boot" in card

    upload(browser, shoe)
    wait_for(browser, lambda d: text(d, "label"), "a prediction")
    assert text(browser, "label") == expected["label"]
    assert text(browser, "unsure") == SURENESS[(expected["unsure"], expected["unsure_reason"])]
    bars = [bar.text.split("\n") for bar in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]
    assert [name for name, _ in bars] == [ranked["label"] for ranked in expected["top_k"]]
    assert bars[0][1] == f"{100 * expected['probability']:.1f} %"
    assert browser.find_element(By.ID, "preview").is_displayed()
    screenshot = tmp_path / "ui.png"
    browser.save_screenshot(str(screenshot))
    if target := os.environ.get("UI_SCREENSHOT"):
        (REPO / target).parent.mkdir(parents=True, exist_ok=True)
        (REPO / target).write_bytes(screenshot.read_bytes())

    # Another model, and all its classes: the image is sent again with them.
    other = next(m["tag"] for m in listed["models"] if not m["default"])
    expected = classify(server, shoe, model=other, top_k="10").json()
    top_k = browser.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("10")
    models.select_by_value(other)
    wait_for(browser, lambda d: other in text(d, "answered-by"), "an answer from the other model")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10, "ten bars")
    assert text(browser, "label") == expected["label"]
    assert text(browser, "unsure") == SURENESS[(expected["unsure"], expected["unsure_reason"])]

    # The strict CSP let the page's own script and style run, and nothing failed.
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_file_that_is_no_image_shows_the_services_error(browser, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    answer = classify(server, notes)
    assert answer.status_code == 400

    open_page(browser, server)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('model').options.length"), "models")
    upload(browser, notes)
    wait_for(browser, lambda d: "400" in text(d, "message"), "the error")
    message = text(browser, "message")
    assert "notes.txt" in message and "400 Bad Request" in message and answer.json()["error"] in message
    assert text(browser, "label") == ""  # no stale prediction beside the error


@pytest.mark.processes
def test_with_auth_on_the_page_asks_for_the_token_keeps_it_and_draws_a_models_map(
    browser, bentoml_home, fashion_test, tmp_path_factory
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    folder = tmp_path_factory.mktemp("serve-auth")
    env = {"SERVING_AUTH_TOKEN": TOKEN}  # and the shipped models, as `make serve` serves them
    with bentoml_serve(bentoml_home, folder / "serve.log", env) as url:
        assert httpx.get(f"{url}/ui", timeout=60).status_code == 200  # open: a navigation sends no bearer header
        assert httpx.get(f"{url}/models", timeout=60).status_code == 401  # what the page calls is not
        image = folder / "trouser.png"
        image.write_bytes(png_bytes(fashion_test[0][2]))  # test image 2, a trouser
        expected = classify(url, image, headers={"Authorization": f"Bearer {TOKEN}"}).json()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        explainer = next(
            m["tag"]
            for m in httpx.get(f"{url}/models", headers=auth, timeout=60).json()["models"]
            if m["name"] == "fashion-resnet20"
        )
        explained = classify(url, image, headers=auth, model=explainer).json()

        open_page(browser, url)
        wait_for(browser, lambda d: d.find_element(By.ID, "token").is_displayed(), "the token field")
        assert "needs a bearer token" in text(browser, "message") and "401" in text(browser, "message")

        def submit(token: str) -> None:
            browser.find_element(By.ID, "token").send_keys(token)
            browser.find_element(By.CSS_SELECTOR, "#token-form button").click()

        submit("wrong")
        wait_for(browser, lambda d: "token was refused" in text(d, "message"), "the refusal")
        submit(TOKEN)
        wait_for(browser, lambda d: not d.find_element(By.ID, "token").is_displayed(), "the token accepted")
        assert browser.execute_script("return sessionStorage.getItem('classic-cnns-token')") == TOKEN
        wait_for(
            browser, lambda d: "no figures before 100 answers" in text(d, "drift"), "GET /monitor, with the token too"
        )
        upload(browser, image)
        wait_for(browser, lambda d: text(d, "label"), "a prediction")
        assert text(browser, "label") == expected["label"]
        assert not browser.find_element(By.ID, "cam").is_displayed()  # LeNet has no map to show

        # The shipped ResNet-20 has one: the page asks /explain, and draws the map beside the image.
        Select(browser.find_element(By.ID, "model")).select_by_value(explainer)
        wait_for(browser, lambda d: "fashion-resnet20" in text(d, "answered-by"), "the ResNet-20's answer")
        cam = browser.find_element(By.ID, "cam")
        wait_for(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", cam) == 28, "the map drawn")
        assert cam.is_displayed() and text(browser, "label") == explained["label"]

        open_page(browser, url)  # a reload in the same tab: the token is still there
        wait_for(browser, lambda d: "fashion-lenet" in text(d, "model"), "the models, without asking again")
        assert not browser.find_element(By.ID, "token").is_displayed()


STATISTICS = [  # GET /monitor's statistics, as the page names them
    "unsure: out of distribution",
    "unsure: low confidence",
    "predicted classes (PSI)",
    "features (Fréchet distance)",
    "mean OOD distance",
]


@pytest.mark.processes
def test_the_drift_section_fills_each_window_then_charts_every_statistic(
    browser, bentoml_home, uncalibrated, fashion_test, tmp_path_factory
):
    from selenium.webdriver.common.by import By

    # A server of its own, so that no other test's answers are in the default model's window; beside it
    # a graph without calibration, hence without a drift reference: listed, not monitored.
    folder = tmp_path_factory.mktemp("serve-drift")
    home = {"BENTOML_HOME": str(bentoml_home)}
    result = run_cli("-m", "model_store", "register", str(uncalibrated), "--name", "plain-lenet", env=home)
    assert result.returncode == 0, result.stderr
    env = {"SERVING_MODELS": "fashion-lenet:latest,plain-lenet:latest"}
    with bentoml_serve(bentoml_home, folder / "serve.log", env) as url:

        def parts() -> dict:  # each model's part, by its tag
            found = browser.find_elements(By.CSS_SELECTOR, "#drift .drift-model")
            return {part.find_element(By.TAG_NAME, "h3").text: part for part in found}

        monitored = {m["model"]: m for m in httpx.get(f"{url}/monitor", timeout=60).json()["models"]}
        lenet = next(tag for tag in monitored if tag.startswith("fashion-lenet:"))
        plain = next(tag for tag in monitored if tag.startswith("plain-lenet:"))
        assert monitored[lenet]["figures"] is None and not monitored[plain]["monitored"]

        browser.get_log("browser")  # drop what earlier pages logged
        open_page(browser, url)
        wait_for(browser, lambda d: len(parts()) == len(monitored), "a part of the Drift section per model")
        assert "0 images seen; no figures before 100 answers: 0 so far" in parts()[lenet].text
        assert parts()[lenet].find_elements(By.CSS_SELECTOR, ".statistic") == []
        assert f"not monitored: {monitored[plain]['reason']}" in parts()[plain].text

        # A full window of real test images, in batches as large as the service takes; after two
        # batches, figures over what the window holds, against the levels for 100 answers.
        images = fashion_test[0][:1000]
        for start in range(0, len(images), 64):
            batch = images[start : start + 64]
            files = [("images", (f"{start + i}.png", png_bytes(image), "image/png")) for i, image in enumerate(batch)]
            answer = httpx.post(f"{url}/classify_batch", files=files, data={"model": "fashion-lenet"}, timeout=60)
            assert answer.status_code == 200, answer.text
            if start == 64:
                open_page(browser, url)
                wait_for(browser, lambda d: lenet in parts(), "the Drift section, filling")
                assert (
                    "128 images seen; figures over the last 128 answers (the window fills to 1,000), "
                    "against the levels for 100" in parts()[lenet].text
                )
                assert len(parts()[lenet].find_elements(By.CSS_SELECTOR, ".statistic")) == len(STATISTICS)
        full = next(m for m in httpx.get(f"{url}/monitor", timeout=60).json()["models"] if m["model"] == lenet)
        assert full["images_seen"] == 1000 and full["figures"] is not None and full["alerts"] == []

        open_page(browser, url)
        wait_for(browser, lambda d: lenet in parts(), "the Drift section again")
        part = parts()[lenet]
        assert "1,000 images seen; figures over the last 1,000 answers" in part.text
        rows = part.find_elements(By.CSS_SELECTOR, ".statistic")
        assert [row.text.split("\n")[0] for row in rows] == STATISTICS
        for row in rows:
            chart = row.find_element(By.CSS_SELECTOR, "svg.spark")
            assert chart.get_attribute("width") == "160" and chart.find_elements(By.CSS_SELECTOR, "polyline, line")
            assert "level " in row.text and "above level" not in row.text and "alert" not in row.get_attribute("class")
        assert part.find_elements(By.CSS_SELECTOR, ".above") == []
        assert "not monitored" in parts()[plain].text  # still listed beside the full window
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_the_review_page_shows_captures_and_takes_a_label_by_key_or_click(browser, bentoml_home, tmp_path):
    """/ui's Review section against a real `bentoml serve` that captures: the image fetched with
    the token, the model's answer beside it, x labels it "not in domain", s skips, a click labels."""
    import numpy as np
    from selenium.webdriver.common.by import By

    from tests.conftest import wait_until

    auth = {"Authorization": f"Bearer {TOKEN}"}
    env = {
        "SERVING_MODELS": "fashion-lenet:latest",
        "SERVING_AUTH_TOKEN": TOKEN,
        "SERVING_CAPTURE": str(tmp_path / "captures"),
        "SERVING_CAPTURE_SAMPLE": "0",
        "SERVING_CAPTURE_RATE": "100000",  # every unsure answer kept, however fast they come
    }
    noise = np.random.default_rng(5).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    with bentoml_serve(bentoml_home, tmp_path / "serve.log", env) as url:
        unsure = 0
        for image in noise:
            files = {"image": ("n.png", png_bytes(image), "image/png")}
            unsure += httpx.post(f"{url}/classify", files=files, headers=auth, timeout=30).json()["unsure"]

        def review() -> dict:
            return httpx.get(f"{url}/review/fashion-lenet", headers=auth, timeout=30).json()

        wait_until(lambda: review()["counts"]["captures"] == unsure >= 3, "the unsure answers captured")
        first, second, third = (c["id"] for c in review()["captures"][:3])

        open_page(browser, url)
        browser.execute_script(f"sessionStorage.setItem('classic-cnns-token', '{TOKEN}')")
        browser.get_log("browser")  # drop the first load's 401, before the token was there
        open_page(browser, url)
        wait_for(browser, lambda d: d.find_element(By.ID, "review").is_displayed(), "the Review section")
        image = browser.find_element(By.ID, "review-image")
        wait_for(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 28, "the capture")
        shown = review()["captures"][0]
        assert f"answered {shown['label']}" in text(browser, "review-answer") and "top 3:" in text(
            browser, "review-answer"
        )
        assert f"{unsure} waiting, 0 labelled of {unsure} captures" in text(browser, "review-counts")
        buttons = browser.find_elements(By.CSS_SELECTOR, "#review-labels button")
        assert [b.text for b in buttons][:2] == ["1: T-shirt/top", "2: Trouser"] and buttons[-1].text.startswith("x: ")

        browser.find_element(By.TAG_NAME, "body").send_keys("x")
        wait_for(browser, lambda d: "1 labelled" in text(d, "review-counts"), "the key's label recorded")
        labels = httpx.get(f"{url}/review/fashion-lenet", headers=auth, timeout=30).json()["counts"]["by_label"]
        assert labels == {"not_in_domain": 1}
        browser.find_element(By.TAG_NAME, "body").send_keys("s")  # the second is skipped ...
        browser.find_element(
            By.CSS_SELECTOR, "#review-labels button[data-label='Bag']"
        ).click()  # ... the third labelled
        wait_for(browser, lambda d: "2 labelled" in text(d, "review-counts"), "the click's label recorded")
        from model_store.captures import CaptureStore

        given = CaptureStore(str(tmp_path / "captures")).labels("fashion-lenet")
        assert {sha: label["label"] for sha, label in given.items()} == {first: "not_in_domain", third: "Bag"}
        assert {label["by"] for label in given.values()} == {"service"} and second not in given
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.processes
def test_the_rollout_section_starts_a_shadow_shows_its_figures_and_promotes(
    browser, bentoml_home, fashion_test, tmp_path
):
    """/ui's Rollout section against a real `bentoml serve` with model control: a candidate started
    from the form, promotion refused (its button off) until enough images were scored by both, then
    promoted with a click, and the page serves the new version."""
    from selenium.webdriver.common.by import By

    from tests.conftest import run_cli, wait_until
    from tests.test_rollout import changed_graph

    auth = {"Authorization": f"Bearer {TOKEN}"}
    env = {
        "SERVING_MODELS": "fashion-lenet",
        "SERVING_AUTH_TOKEN": TOKEN,
        "SERVING_MODEL_CONTROL": "true",
        "SERVING_ROLLOUT_MIN_REQUESTS": "20",
        "SERVING_ROLLOUT_STATE": str(tmp_path / "rollout.json"),
    }
    log = tmp_path / "serve.log"
    with bentoml_serve(bentoml_home, log, env) as url:
        graph = changed_graph(tmp_path / "candidate.onnx", temperature=1.5)
        home = {"BENTOML_HOME": str(log.parent / "bentoml")}
        registered = run_cli("-m", "model_store", "register", str(graph), "--name", "fashion-lenet", env=home)
        assert registered.returncode == 0, registered.stderr
        candidate = registered.stdout.split()[1]
        live = httpx.get(f"{url}/models", headers=auth, timeout=30).json()["default"]

        open_page(browser, url)
        browser.execute_script(f"sessionStorage.setItem('classic-cnns-token', '{TOKEN}')")
        browser.get_log("browser")  # drop the first load's 401, before the token was there
        open_page(browser, url)
        wait_for(browser, lambda d: d.find_element(By.ID, "rollout").is_displayed(), "the Rollout section")
        assert "fashion-lenet has no candidate" in text(browser, "rollout-state")
        browser.find_element(By.ID, "rollout-candidate").send_keys(candidate)
        browser.find_element(By.CSS_SELECTOR, "#rollout-form button[type=submit]").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "rollout-current").is_displayed(), "the rollout shown")
        assert text(browser, "rollout-state") == f"fashion-lenet: {candidate} in shadow beside {live}"
        assert "Promotion refused: only 0 images" in text(browser, "rollout-gate")
        assert not browser.find_element(By.ID, "rollout-promote").is_enabled()

        for image in fashion_test[0][:60]:  # real clothes: sure answers, on which the two versions agree
            files = {"image": ("x.png", png_bytes(image), "image/png")}
            assert httpx.post(f"{url}/classify", files=files, headers=auth, timeout=30).status_code == 200
        wait_until(lambda: httpx.get(f"{url}/rollout", headers=auth, timeout=30).json()["rollouts"][0]["scored_by_both"]
                   == 60, "60 images scored by both")  # fmt: skip
        gates = httpx.get(f"{url}/rollout", headers=auth, timeout=30).json()["rollouts"][0]["gates"]
        assert gates["promotable"], gates
        browser.find_element(By.ID, "rollout-set").click()  # percent 0 again: the section reads the figures anew
        wait_for(browser, lambda d: "Promotion allowed." in text(d, "rollout-gate"), "the gate open")
        assert "images scored 60 60\nunsure " in text(browser, "rollout-table")
        browser.find_element(By.ID, "rollout-promote").click()
        wait_for(browser, lambda d: "has no candidate" in text(d, "rollout-state"), "the promotion")
        assert f"{candidate}: promoted (asked)" in text(browser, "rollout-ended")
        wait_for(
            browser, lambda d: d.find_element(By.ID, "model").get_attribute("value") == candidate, "the new version"
        )
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

"""Models this project did not build (export.foreign): torchvision networks with weights made here
(hubs are not reachable, and the file is the user's anyway), and ONNX files exported the way users
export them, wrapped, registered and served by a real `bentoml serve`, answering as the original
PyTorch model answers on images decoded the same way."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image

from model_store import ModelCard, image_bytes_to_input
from model_store.store import read_onnx_card
from tests.conftest import bentoml_serve, run_cli
from tests.tolerance import PROB_ATOL

CLASSES = ("hat", "scarf", "glove", "sock")
SIZE = 64  # small enough for a test; the builders' own default (224) is checked on the card
POOLED = "/avgpool/GlobalAveragePool_output_0"  # ResNet-18's pooled features, as torch.onnx.export names them
CLASSES_FILE = ["--classes", "{dir}/classes.txt"]
TIMM = "mobilenetv3_small_050"  # timm's own MobileNetV3, not torchvision's: its head ends in a 1x1 conv
IMAGENET = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]


class ChannelsLast(torch.nn.Module):
    """A network that takes [N, H, W, C], as Keras-born graphs do."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def made(tmp_path_factory, fashion_test) -> dict:
    """The user's files: two torchvision state_dicts, and ONNX files exported by plain
    torch.onnx.export from a torchvision model taking float input: logits with a fixed batch of 1
    (TorchScript exporter), probabilities (a Softmax at the end), channels last, and a default
    (dynamo) export with its batch baked into a Reshape, which cannot be wrapped."""
    import torchvision

    out = tmp_path_factory.mktemp("theirs")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    images, labels = fashion_test
    for i in np.flatnonzero(labels < len(CLASSES))[:160]:  # the user's held-out images, by class
        (out / "held-out" / CLASSES[labels[i]]).mkdir(parents=True, exist_ok=True)
        (out / "held-out" / CLASSES[labels[i]] / f"{i}.png").write_bytes(photo(images[i]))
    torch.manual_seed(0)
    nets = {}
    for name in ("resnet18", "mobilenet_v3_small"):
        nets[name] = torchvision.models.get_model(name, weights=None, num_classes=len(CLASSES)).eval()
        torch.save(nets[name].state_dict(), out / f"{name}.pt")
    nets["timm"] = timm.create_model(TIMM, pretrained=False, num_classes=len(CLASSES)).eval()
    torch.save(nets["timm"].state_dict(), out / "timm.pt")
    example = torch.zeros(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exports = {
            "plain": (nets["resnet18"], example, False),
            "softmax": (torch.nn.Sequential(nets["resnet18"], torch.nn.Softmax(dim=1)), example, False),
            "nhwc": (ChannelsLast(nets["resnet18"]), example.permute(0, 2, 3, 1), False),
            "baked": (nets["resnet18"], example, True),
        }
        for name, (net, x, dynamo) in exports.items():
            torch.onnx.export(net.eval(), (x,), str(out / f"{name}.onnx"), dynamo=dynamo)
    return {"dir": out, "nets": nets}


def export(*args: str):
    return run_cli("-m", "export", *args)


@pytest.fixture(scope="module")
def wrapped(made) -> dict[str, Path]:
    """Each model exported or wrapped through `python -m export`, as a user runs it."""
    theirs, out = made["dir"], made["dir"] / "ours"
    classes = ["--classes", str(theirs / "classes.txt")]
    commands = {
        "tv-resnet18": ["--from-torchvision", "resnet18", "--weights", str(theirs / "resnet18.pt"), "--size", str(SIZE)],
        "tv-mobilenet": ["--from-torchvision", "mobilenet_v3_small", "--weights", str(theirs / "mobilenet_v3_small.pt"),
                         "--size", str(SIZE)],
        "tv-calibrated": ["--from-torchvision", "resnet18", "--weights", str(theirs / "resnet18.pt"), "--size", str(SIZE),
                          "--calibrate-on", str(theirs / "held-out")],
        "onnx-plain": ["--from-onnx", str(theirs / "plain.onnx"), *IMAGENET],
        "onnx-softmax": ["--from-onnx", str(theirs / "softmax.onnx"), *IMAGENET],
        "onnx-nhwc": ["--from-onnx", str(theirs / "nhwc.onnx"), *IMAGENET],
        "timm-mobilenet": ["--from-timm", TIMM, "--weights", str(theirs / "timm.pt"), "--size", str(SIZE)],
        # the features found behind the wrapped Softmax (Log, Max, Softmax, Gemm), or named: a [N, 512, 1, 1] map
        "onnx-softmax-calibrated": ["--from-onnx", str(theirs / "softmax.onnx"), *IMAGENET,
                                    "--calibrate-on", str(theirs / "held-out")],
        "onnx-named-features": ["--from-onnx", str(theirs / "plain.onnx"), *IMAGENET, "--calibrate-on",
                                str(theirs / "held-out"), "--features", POOLED],
    }  # fmt: skip
    paths = {}
    for name, arguments in commands.items():
        paths[name] = out / f"{name}.onnx"
        result = export(*arguments, *classes, "--output", str(paths[name]))
        assert result.returncode == 0, result.stderr[-3000:]
        calibrating = "--calibrate-on" in arguments
        assert ('its answers will say "unsure": null' in result.stdout) != calibrating, result.stdout
    return paths


def test_the_cards_follow_the_builders_transforms_and_the_arguments(wrapped):
    card = read_onnx_card(wrapped["tv-resnet18"])
    # torchvision's ResNet18_Weights.DEFAULT.transforms(): ImageNet's mean and std, bilinear
    assert (card.arch, card.class_names, card.mean, card.std) == (
        "torchvision:resnet18",
        CLASSES,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    # ... and its framing: resize 256, crop 224, the share of the short side kept at any size
    assert (card.height, card.width, card.in_channels, card.resize, card.interpolation, card.crop_fraction) == (
        SIZE,
        SIZE,
        3,
        "crop",
        "bilinear",
        0.875,
    )
    # timm's pretrained config for the model: bicubic, crop_pct 0.875
    timm_card = read_onnx_card(wrapped["timm-mobilenet"])
    assert (timm_card.arch, timm_card.interpolation, timm_card.crop_fraction, timm_card.mean) == (
        f"timm:{TIMM}",
        "bicubic",
        0.875,
        (0.485, 0.456, 0.406),
    )
    assert card.calibration is None and card.export["source"] == "torchvision:resnet18"
    assert card.export["parity"]["max_abs_logit_diff"] <= 1e-4
    assert read_onnx_card(wrapped["onnx-softmax"]).export["scores"] == "probabilities"
    assert read_onnx_card(wrapped["onnx-nhwc"]).export["layout"] == "NHWC"
    assert read_onnx_card(wrapped["onnx-plain"]).export["scores"] == "logits"
    # --calibrate-on: half the held-out images fit the calibration and the OOD head, half measure them
    calibrated = read_onnx_card(wrapped["tv-calibrated"])
    assert calibrated.calibration is not None and calibrated.calibration.validation_images == 80
    assert set(calibrated.metrics["calibration"]) >= {"validation", "test"}
    assert calibrated.export["ood"]["bank_images"] == 40
    # 512 features, wider than a drift window's covariance affords: drift on the head's 32 principal axes
    assert calibrated.export["ood"]["features"] == 512 and calibrated.export["ood"]["dims"] == 32
    assert calibrated.export["ood"]["drift_features"] == "the first 32 principal axes"
    # scored by the residual off the bank's principal subspace, of a quarter of its 40 images' axes
    assert calibrated.export["ood"]["residual_axes"] == 10 and "k" not in calibrated.export["ood"]
    # found behind the Softmax (Log, Max, Softmax, Gemm): a head at all; named: the tensor, in the card
    found = read_onnx_card(wrapped["onnx-softmax-calibrated"]).export["ood"]
    assert found["features"] == 512 and "tensor" not in found
    named = read_onnx_card(wrapped["onnx-named-features"]).export["ood"]
    assert (named["tensor"], named["features"]) == (POOLED, 512)


def test_a_wide_network_s_ood_distance_is_its_features_residual_off_the_bank_s_axes(made, wrapped):
    """The 512 features of a ResNet-18, taken from the PyTorch model: the graph's distance is their
    length off the principal axes it carries, and its features output their projection on the first
    32; the bank's rows are not in the graph."""
    import onnx
    from onnx import numpy_helper

    from model_store.engine import FEATURES_OUTPUT, OOD_OUTPUT, OnnxClassifier

    path = wrapped["tv-calibrated"]
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(path).graph.initializer}
    mean, span, axes = weights["ood_mean"], weights["ood_span"], weights["ood_axes"]
    assert span.shape == (512, 10) and axes.shape == (512, 32) and not any("bank" in name for name in weights)
    assert np.allclose(span.T @ span, np.eye(10), atol=1e-5) and np.allclose(axes[:, :10], span, atol=1e-6)
    engine = OnnxClassifier(path, device="cpu")
    files = sorted((made["dir"] / "held-out").rglob("*.png"))[::8]
    pixels = np.stack([image_bytes_to_input(f.read_bytes(), engine.card) for f in files])
    noise = np.random.default_rng(0).integers(0, 256, (8, *pixels.shape[1:]), dtype=np.uint8)
    pixels = np.concatenate([pixels, noise])
    distances, projected = engine.run(pixels, [OOD_OUTPUT, FEATURES_OUTPUT])
    net = made["nets"]["resnet18"]
    x = torch.from_numpy(pixels).float() / 255.0
    x = (x - torch.tensor(engine.card.mean).view(1, -1, 1, 1)) / torch.tensor(engine.card.std).view(1, -1, 1, 1)
    with torch.no_grad():
        features = torch.flatten(torch.nn.Sequential(*list(net.children())[:-1])(x), 1).double().numpy()
    centred = features - mean
    residual = np.linalg.norm(centred - centred @ span @ span.T, axis=1)
    assert np.allclose(distances, residual, rtol=1e-3, atol=1e-3 * np.abs(residual).max())
    assert np.allclose(projected, centred @ axes, rtol=1e-3, atol=1e-3 * np.abs(centred @ axes).max())


def photo(image: np.ndarray) -> bytes:
    """A test image as an RGB photo of another aspect ratio: the card's crop has work to do."""
    buffer = io.BytesIO()
    Image.fromarray(image).convert("RGB").resize((80, 96), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return buffer.getvalue()


def torch_probabilities(
    net: torch.nn.Module, card: ModelCard, data: bytes, channels_last: bool = False, temperature: float = 1.0
) -> np.ndarray:
    """The original PyTorch model's probabilities for an image decoded as the service decodes it."""
    pixels = torch.from_numpy(image_bytes_to_input(data, card)[None]).float() / 255.0
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    x = (pixels - mean) / std
    with torch.no_grad():
        return torch.softmax(net(x.permute(0, 2, 3, 1) if channels_last else x) / temperature, dim=1)[0].numpy()


@pytest.mark.processes
def test_each_is_registered_served_and_answers_as_the_original(made, wrapped, bentoml_home, fashion_test, tmp_path):
    home = tmp_path / "bentoml"
    import shutil

    shutil.copytree(bentoml_home / "models", home / "models")
    for name, path in wrapped.items():
        result = run_cli("-m", "model_store", "register", str(path), "--name", name, env={"BENTOML_HOME": str(home)})
        assert result.returncode == 0, result.stderr
    originals = {
        "tv-resnet18": (made["nets"]["resnet18"], False),
        "tv-mobilenet": (made["nets"]["mobilenet_v3_small"], False),
        "tv-calibrated": (made["nets"]["resnet18"], False),
        "onnx-plain": (made["nets"]["resnet18"], False),
        "onnx-softmax": (made["nets"]["resnet18"], False),  # softmax of the same logits
        "onnx-nhwc": (ChannelsLast(made["nets"]["resnet18"]), True),
        "timm-mobilenet": (made["nets"]["timm"], False),
        "onnx-softmax-calibrated": (made["nets"]["resnet18"], False),
        "onnx-named-features": (made["nets"]["resnet18"], False),
    }
    calibrated = ("tv-calibrated", "onnx-softmax-calibrated", "onnx-named-features")
    images = [photo(image) for image in fashion_test[0][:6]]
    settings = {"SERVING_MODELS": ",".join(["fashion-lenet", *wrapped]), "SERVING_LOG_REQUESTS": "false"}
    log = tmp_path / "serve" / "serve.log"
    log.parent.mkdir()
    with bentoml_serve(home, log, settings) as url:
        listed = {m["name"]: m for m in httpx.get(f"{url}/models", timeout=60).json()["models"]}
        assert set(wrapped) <= set(listed)
        assert tuple(n for n in wrapped if "calibration" in listed[n]["card"]) == calibrated
        for name, (net, channels_last) in originals.items():
            card = read_onnx_card(wrapped[name])
            for data in images:
                response = httpx.post(
                    f"{url}/classify",
                    files={"image": ("x.png", data, "image/png")},
                    data={"model": name, "top_k": str(len(CLASSES))},
                    timeout=60,
                )
                assert response.status_code == 200, response.text
                answer = response.json()
                assert (answer["unsure"] is None) == (name not in calibrated) and answer["model"] == name
                served = np.zeros(len(CLASSES))
                for ranked in answer["top_k"]:
                    served[ranked["index"]] = ranked["probability"]
                # ONNX Runtime against PyTorch fp32 on the same pixels: logits within 1e-4 (export's bound);
                # a calibrated model's probabilities are its logits' at the card's temperature
                temperature = card.calibration.temperature if card.calibration else 1.0
                expected = torch_probabilities(net, card, data, channels_last, temperature)
                np.testing.assert_allclose(served, expected, atol=10 * PROB_ATOL)
        explained = httpx.post(
            f"{url}/explain",
            files={"image": ("x.png", images[0], "image/png")},
            data={"model": "tv-resnet18"},
            timeout=60,
        )
        assert explained.status_code == 422 and "has no class-activation map" in explained.json()["error"]
        # Drift is watched on the 32 principal axes: figures from the 100th answer on (the 6 above count)
        held_out = sorted((made["dir"] / "held-out").rglob("*.png"))[:100]
        for start in range(0, len(held_out), 50):
            files = [("images", (p.name, p.read_bytes(), "image/png")) for p in held_out[start : start + 50]]
            response = httpx.post(f"{url}/classify_batch", files=files, data={"model": "tv-calibrated"}, timeout=120)
            assert response.status_code == 200, response.text
        monitored = {m["model"].split(":")[0]: m for m in httpx.get(f"{url}/monitor", timeout=60).json()["models"]}
        assert [name for name in wrapped if monitored[name]["monitored"]] == list(calibrated)
        figures = monitored["tv-calibrated"]["figures"]
        assert monitored["tv-calibrated"]["answers"] == len(images) + 100 and np.isfinite(figures["feature_frechet"])
        v2 = httpx.get(f"{url}/v2/models/onnx-nhwc", timeout=60).json()
        assert v2["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE] and v2["inputs"][0]["datatype"] == "UINT8"


def test_the_page_shows_a_foreign_model_s_card_and_its_answers(browser, made, wrapped, bentoml_home, tmp_path):
    """/ui with a torchvision model calibrated on the user's images and an uncalibrated timm one:
    each one's card (architecture, framing, normalization) and the answer /classify gives."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_ui_browser import SURENESS, open_page, text, upload, wait_for

    home = tmp_path / "bentoml"
    import shutil

    shutil.copytree(bentoml_home / "models", home / "models")
    shown = ("tv-calibrated", "timm-mobilenet")
    for name in shown:
        result = run_cli(
            "-m", "model_store", "register", str(wrapped[name]), "--name", name, env={"BENTOML_HOME": str(home)}
        )
        assert result.returncode == 0, result.stderr
    image = tmp_path / "glove.png"
    image.write_bytes(photo(np.asarray(Image.open(sorted((made["dir"] / "held-out" / "glove").glob("*.png"))[0]))))
    log = tmp_path / "serve" / "serve.log"
    log.parent.mkdir()
    settings = {"SERVING_MODELS": ",".join(["fashion-lenet", *shown]), "SERVING_LOG_REQUESTS": "false"}
    with bentoml_serve(home, log, settings) as url:
        browser.get_log("browser")  # drop what earlier pages logged
        open_page(browser, url)
        models = Select(browser.find_element(By.ID, "model"))
        wait_for(browser, lambda d: len(models.options) == 1 + len(shown), "every model listed")
        tags = {m["name"]: m["tag"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"]}
        for name, arch in zip(shown, ("torchvision:resnet18", f"timm:{TIMM}")):
            models.select_by_value(tags[name])
            wait_for(browser, lambda d: arch in text(d, "card-fields"), f"{name}'s card")
            card = text(browser, "card-fields")
            assert f"{SIZE} × {SIZE} px, resize crop, keeps 87.5 % of the short side" in card
            assert "3 (RGB)" in card and "mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225" in card
            assert ", ".join(CLASSES) in card and "test accuracy" not in card  # a foreign card has none
            answer = httpx.post(
                f"{url}/classify", files={"image": ("glove.png", image.read_bytes(), "image/png")},
                data={"model": name}, timeout=60,
            ).json()  # fmt: skip
            upload(browser, image)
            wait_for(browser, lambda d: name in text(d, "answered-by"), f"an answer from {name}")
            assert text(browser, "label") == answer["label"]
            assert text(browser, "unsure") == SURENESS[(answer["unsure"], answer["unsure_reason"])]
            assert (answer["unsure"] is None) == (name == "timm-mobilenet")
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--from-onnx", "{dir}/baked.onnx", *IMAGENET, *CLASSES_FILE], "the graph's input [1, 3, 64, 64] is fixed to a batch of 1 and it does not run at a batch of 16"),
        (["--from-onnx", "{dir}/plain.onnx", *CLASSES_FILE], "--from-onnx needs --mean and --std"),
        (["--from-onnx", "{dir}/plain.onnx", *IMAGENET, "--classes", "{dir}/resnet18.pt"], "--classes {dir}/resnet18.pt"),
        (["--from-onnx", "{dir}/plain.onnx", *IMAGENET, *CLASSES_FILE, "--fp16"], "--fp16 and --float-input apply to --checkpoint and --from-torchvision"),
        (["--from-torchvision", "resnet18"], "--from-torchvision needs --weights"),
        (["--from-timm", "resnet99", "--weights", "{dir}/timm.pt"], "--from-timm 'resnet99' is not a timm model; e.g. resnet"),
        (["--from-onnx", "{dir}/plain.onnx", *IMAGENET, *CLASSES_FILE, "--calibrate-on", "{dir}/held-out", "--features", "/avgpool"],
         "--features '/avgpool' is no tensor the graph computes; e.g. ['/avgpool/GlobalAveragePool_output_0']"),
        (["--from-onnx", "{dir}/plain.onnx", *IMAGENET, *CLASSES_FILE, "--features", POOLED], "--features names the tensor"),
        (["--from-torchvision", "resnet18", "--weights", "{dir}/resnet18.pt", *CLASSES_FILE, "--resize", "fit", "--crop-fraction", "0.875"],
         "--crop-fraction 0.875 goes with --resize crop, not --resize fit"),
        (["--from-torchvision", "resnet18", "--weights", "{dir}/mobilenet_v3_small.pt"], "does not fit torchvision:resnet18 with 4 classes: missing"),
        (["--from-torchvision", "resnet99", "--weights", "{dir}/resnet18.pt"], "--from-torchvision 'resnet99' is not a torchvision classification builder"),
        (["--from-torchvision", "resnet18", "--weights", "{dir}/resnet18.pt"], "the model has 4 outputs: give their names with --classes FILE"),
        ([], "give one of --checkpoint, --from-torchvision NAME, --from-timm NAME or --from-onnx FILE; got none"),
        (["--from-onnx", "{dir}/resnet18.pt", *IMAGENET, *CLASSES_FILE], "--from-onnx {dir}/resnet18.pt is not an ONNX model"),
    ],
)  # fmt: skip
def test_what_cannot_be_wrapped_is_one_line_naming_why(made, tmp_path, arguments, message):
    folder = str(made["dir"])
    result = export(*(a.format(dir=folder) for a in arguments), "--output", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr[-2000:]
    assert message.format(dir=folder) in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


def test_the_scorer_answers_with_a_foreign_model_as_the_original(made, wrapped, tmp_path):
    """`python -m scoring` with a wrapped timm model and a calibrated torchvision one: the card's
    decoding and temperature, the original network's probabilities, unsure said for the calibrated one."""
    folder = made["dir"] / "held-out"
    for name, net in (("timm-mobilenet", made["nets"]["timm"]), ("tv-calibrated", made["nets"]["resnet18"])):
        output = tmp_path / name
        result = run_cli(
            "-m", "scoring", str(folder), "--output", str(output), "--onnx", str(wrapped[name]), timeout=300
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        rows = pq.read_table(output).to_pylist()
        card = read_onnx_card(wrapped[name])
        temperature = card.calibration.temperature if card.calibration else 1.0
        assert len(rows) == 160 and all(row["error"] is None for row in rows)
        assert {type(row["unsure"]) for row in rows} == ({bool} if card.calibration else {type(None)})
        for row in rows[:10]:
            expected = torch_probabilities(net, card, (folder / row["path"]).read_bytes(), temperature=temperature)
            # the scorer's top class: the original's most probable one, or one within rounding of it
            assert row["probability"] == pytest.approx(expected[CLASSES.index(row["label"])], abs=10 * PROB_ATOL)
            assert row["probability"] == pytest.approx(expected.max(), abs=10 * PROB_ATOL)

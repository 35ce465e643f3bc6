"""python -m serving.batch over a real folder: nested images, broken files, CSV out."""

import csv

from PIL import Image

from tests.conftest import png_bytes, run_cli


def test_scores_a_folder_reports_broken_files_and_keeps_going(tmp_path, fashion_test):
    from training.data import FASHION_MNIST_CLASSES

    images, labels = fashion_test
    folder = tmp_path / "photos"
    truth = {}
    for i in range(120):
        path = folder / f"class_{labels[i]}" / ("deep" if i % 3 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(images[i]))
        truth[path.relative_to(folder).as_posix()] = FASHION_MNIST_CLASSES[labels[i]]
    Image.fromarray(images[200]).convert("RGB").resize((280, 280)).save(folder / "big.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(png_bytes(images[0])[:40])
    output = tmp_path / "out" / "predictions.csv"

    result = run_cli(
        "-m",
        "serving.batch",
        str(folder),
        "--output",
        str(output),
        "--batch-size",
        "32",
        "--onnx",
        "model_store/default/fashion-lenet.onnx",
    )
    assert result.returncode == 0, result.stderr
    assert "scored 121 of 123 files (2 failed)" in result.stdout
    rows = {row["path"]: row for row in csv.DictReader(open(output))}
    assert len(rows) == 123
    assert "not a supported image" in rows["notes.txt"]["error"] and rows["notes.txt"]["label"] == ""
    assert "truncated" in rows["broken.png"]["error"]
    assert rows["big.jpg"]["error"] == "" and rows["big.jpg"]["label"] in FASHION_MNIST_CLASSES
    correct = sum(rows[name]["label"] == label for name, label in truth.items())
    assert correct / len(truth) >= 0.85
    assert len(rows["class_9/img0.png"]["top_k"].split(";")) == 3
    assert [p.name for p in output.parent.iterdir()] == ["predictions.csv"]  # no temp file left


def test_bad_arguments_fail_in_one_line(tmp_path):
    missing = run_cli("-m", "serving.batch", str(tmp_path / "nope"), "--output", str(tmp_path / "o.csv"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: folder")
    bad_k = run_cli(
        "-m",
        "serving.batch",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
        "--top-k",
        "11",
        "--onnx",
        "model_store/default/fashion-lenet.onnx",
    )
    assert bad_k.returncode == 2 and "--top-k must be from 1 to 10" in bad_k.stderr
    unknown = run_cli(
        "-m",
        "serving.batch",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
        "--model",
        "no-such:v1",
        env={"BENTOML_HOME": str(tmp_path / "home")},
    )
    assert unknown.returncode == 2 and "not in the BentoML model store" in unknown.stderr
    assert not (tmp_path / "o.csv").exists()


def test_serving_path_does_not_import_torch():
    code = "import sys, serving.service, serving.batch; assert 'torch' not in sys.modules, 'torch imported'"
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr

"""The loop, end to end, on the real service: a shifted stream captured, a scripted reviewer's
labels, a fine-tune from the live model's own checkpoint, export, register, shadow, canary,
promote; then a broken candidate through the same gates.

    python -m benchmarks.loop --write BENCHMARKS.md

**The shift: a new catalogue.** A shop starts sending product photos as most shops take them:
the garment on a white background (Fashion-MNIST's are on black), upscaled to 112 px, JPEG at
quality 85. The shipped LeNet answers 99% of them unsure (97% out of distribution) and gets a
quarter right. The stream is test images 0-4,999 so photographed; every figure "on the shifted
images" is on images 5,000-9,999 so photographed, and "on the original test set" on images
5,000-9,999 as they are: no image the fine-tune saw is scored.

Steps, each with its wall time and CPU (the service's process tree for what the service does, the
command's process for a command's): the stream through ``POST /classify`` with capture on; the
reviewer labels ``--labels`` captures, most useful first (``/review``), from the ground truth;
``captures export``; ``training finetune --from fashion-lenet``; ``export``; ``register``; the
rollout: shadow, canary at 10%, promote, each under wrk at concurrency 32 with live traffic (half
original images, half the new catalogue), with the p99 of each phase and the server CPU per
request against the same load with no rollout. The broken candidate is fine-tuned on the same
images with their labels shuffled and no replay; it is shadowed, its promotion asked for, and put
on canary at 50%, where its gate must roll it back on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.load import measured, run_wrk, write_bodies
from benchmarks.report import device, write_section
from benchmarks.servers import REPO, free_port, process
from model_store.captures import folder_name
from model_store.engine import OnnxClassifier, unsure_reasons
from model_store.preprocess import image_bytes_to_input
from training.fashion_mnist_files import FASHION_MNIST_CLASSES, load_fashion_mnist

SECTION, HEADING = "loop", "## The loop: from a shifted stream to a promoted model, on 2 cores"
TOKEN = "loop-bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STREAM, EVALUATE = range(0, 5000), range(5000, 10000)
CONCURRENCY = 32


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000, help="captures the reviewer labels (default: 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each wrk phase (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of shadow off and on, for its cost (default: 3)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)")
    return parser


def catalogue_photo(image: np.ndarray) -> bytes:
    """A Fashion-MNIST image as the new shop photographs it: on white, 112 px, JPEG at quality 85."""
    buffer = io.BytesIO()
    Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def plain_photo(image: np.ndarray) -> bytes:
    """The same, as the shops the model knows photograph: on black."""
    buffer = io.BytesIO()
    Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class Steps:
    """Each step's wall seconds and CPU seconds, in order."""

    def __init__(self, server_pid: int):
        self.server_pid, self.rows = server_pid, []

    @contextlib.contextmanager
    def step(self, name: str, where: str):
        """``where``: "service" (the service's CPU and this process's, its client) or "command"."""
        mine = resource.getrusage(resource.RUSAGE_SELF)
        with measured(self.server_pid if where == "service" else None) as cost:
            yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        client = (after.ru_utime + after.ru_stime) - (mine.ru_utime + mine.ru_stime)
        cpu = (cost.server_cpu or 0.0) + cost.client_cpu + (client if where == "service" else 0.0)
        self.rows.append({"step": name, "seconds": cost.seconds, "cpu_s": cpu, "server_cpu_s": cost.server_cpu})
        print(f"  {name}: {cost.seconds:.1f} s, {cpu:.1f} CPU s", flush=True)


def command(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def finetune(env: dict, reviewed: Path, output: Path, *more: str) -> str:
    """`python -m training finetune` from the live fashion-lenet on ``reviewed``; what it printed."""
    arguments = ["--from", "fashion-lenet", "--reviewed", str(reviewed), "--output-dir", str(output), *more]
    return command(env, "-m", "training", "finetune", *arguments, "--device", "cpu")


def stream(base: str, photos: list[bytes]) -> list[dict]:
    """Send each photo once, 8 at a time: the shop's traffic; the answers, in order."""
    with httpx.Client(timeout=60, headers=AUTH) as client, ThreadPoolExecutor(8) as pool:

        def one(photo: bytes) -> dict:
            response = client.post(f"{base}/classify", files={"image": ("p.jpg", photo, "image/jpeg")})
            response.raise_for_status()
            return response.json()

        return list(pool.map(one, photos))


def review(base: str, truth: dict[str, str], count: int, shuffled: dict[str, str] | None = None) -> int:
    """The scripted reviewer: label ``count`` captures, most useful first, from the ground truth."""
    labelled = 0
    with httpx.Client(timeout=60, headers=AUTH) as client:
        while labelled < count:
            queue = client.get(f"{base}/review/fashion-lenet", params={"limit": min(500, count - labelled)}).json()
            pairs = [{"id": c["id"], "label": truth[c["id"]]} for c in queue["captures"] if c["id"] in truth]
            if not pairs:
                break
            client.post(f"{base}/review/fashion-lenet/labels", json={"labels": pairs}).raise_for_status()
            labelled += len(pairs)
    return labelled


def accuracy(graph: Path, photos: list[bytes], labels: np.ndarray) -> dict:
    """Accuracy, unsure share and accuracy of sure answers of a graph on photos, decoded as served."""
    engine = OnnxClassifier(graph, device="cpu")
    pixels = np.stack([image_bytes_to_input(photo, engine.card) for photo in photos])
    outcomes = engine.outcomes(pixels)
    right = outcomes.probabilities.argmax(axis=1) == labels
    sure = np.array([r is None for r in unsure_reasons(outcomes, engine.card.calibration)])
    return {
        "accuracy": float(right.mean()),
        "unsure": float(1 - sure.mean()),
        "sure_accuracy": float(right[sure].mean()) if sure.any() else None,
    }


def wrk_phase(base: str, bodies, pid: int, seconds: float, during=None) -> dict:
    """One wrk run at CONCURRENCY; ``during()`` runs on a thread halfway through (a switch)."""
    timer = None
    if during is not None:
        timer = threading.Timer(seconds / 2, during)
        timer.start()
    result = run_wrk(f"{base}/classify", bodies, CONCURRENCY, seconds, pid)
    if timer is not None:
        timer.join()
    if result["errors"]:  # the goal is none: a figure with failed requests in it is not the loop's
        raise SystemExit(f"error: {result['errors']} requests failed under load: {result}")
    return result


def rollout(base: str, path: str = "", body: dict | None = None) -> httpx.Response:
    if body is None and not path:
        return httpx.get(f"{base}/rollout", headers=AUTH, timeout=60)
    return httpx.post(f"{base}/rollout/fashion-lenet{path}", json=body, headers=AUTH, timeout=330)


def wait_for(condition, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"error: not within {timeout_s:g} s: {what}")
        time.sleep(0.2)
    return result


def run(workdir: Path, args) -> dict:
    images, labels = load_fashion_mnist("test")
    photos = [catalogue_photo(images[i]) for i in STREAM]
    truth = {hashlib.sha256(p).hexdigest(): FASHION_MNIST_CLASSES[labels[i]] for p, i in zip(photos, STREAM)}
    shifted = [catalogue_photo(images[i]) for i in EVALUATE]
    original = [plain_photo(images[i]) for i in EVALUATE]
    truth_eval = labels[np.asarray(EVALUATE)]
    mixed = [photo for pair in zip(original[:256], shifted[:256]) for photo in pair]  # live traffic: both shops
    bodies = dataclasses.replace(
        write_bodies(workdir / "bodies", mixed, "image/jpeg"), headers=(f"Authorization: Bearer {TOKEN}",)
    )

    home = workdir / "bentoml"
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    command(env, "-m", "model_store", "register-default")
    settings = {
        **env,
        "SERVING_MODELS": "fashion-lenet",
        "SERVING_AUTH_TOKEN": TOKEN,
        "SERVING_MODEL_CONTROL": "true",
        "SERVING_CAPTURE": str(workdir / "captures"),
        "SERVING_CAPTURE_RATE": "1000",  # the stream comes faster than the default 10 a second
        "SERVING_ROLLOUT_STATE": str(workdir / "rollout.json"),
        "SERVING_LOG_REQUESTS": "false",
    }
    from model_store.store import DEFAULT_MODEL_FILE

    before = {
        "shifted": accuracy(DEFAULT_MODEL_FILE, shifted, truth_eval),
        "original": accuracy(DEFAULT_MODEL_FILE, original, truth_eval),
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    result: dict = {"before": before}
    with process("service", serve, settings, base + "/readyz", workdir) as pid:
        steps = Steps(pid)
        loop_start = time.perf_counter()
        with steps.step("stream: 5,000 new-catalogue photos through /classify, capture on", "service"):
            answers = stream(base, photos)
        result["stream"] = {
            "answers": len(answers),
            "unsure": sum(a["unsure"] for a in answers) / len(answers),
            "accuracy": float(
                np.mean([a["label"] == truth[hashlib.sha256(p).hexdigest()] for a, p in zip(answers, photos)])
            ),
        }
        wait_for(
            lambda: (
                httpx.get(f"{base}/review/fashion-lenet", params={"limit": 1}, headers=AUTH).json()["counts"][
                    "captures"
                ]
                >= min(args.labels, 0.9 * sum(a["unsure"] for a in answers))
            ),
            "the captures stored",
        )
        with steps.step(f"review: {args.labels:,} captures labelled from the ground truth", "service"):
            result["labels"] = review(base, truth, args.labels)
        # The load with no rollout, beside which shadow's cost is judged: its time is not the loop's.
        paused = time.perf_counter()
        run_wrk(f"{base}/classify", bodies, 4, 1, pid)  # warm
        result["baseline"] = wrk_phase(base, bodies, pid, args.seconds)
        loop_start += time.perf_counter() - paused
        reviewed = workdir / "reviewed"
        with steps.step("captures export", "command"):
            command(
                env,
                "-m",
                "model_store",
                "captures",
                "export",
                "--store",
                str(workdir / "captures"),
                "--model",
                "fashion-lenet",
                "--output",
                str(reviewed),
            )
        with steps.step("training finetune --from fashion-lenet", "command"):
            printed = finetune(env, reviewed, workdir / "field")
        result["finetune"] = [
            line.split("; checkpoints in")[0] for line in printed.splitlines() if line.startswith(("before:", "after:"))
        ]
        graph = workdir / "field.onnx"
        with steps.step("export", "command"):
            command(env, "-m", "export", "--checkpoint", str(workdir / "field" / "last.pt"), "--output", str(graph))
        with steps.step("register", "command"):
            tag = command(
                env,
                "-m",
                "model_store",
                "register",
                str(graph),
                "--name",
                "fashion-lenet",
                "--checkpoint",
                str(workdir / "field" / "last.pt"),
            ).split()[1]
        with steps.step("rollout: shadow (load and warm up the candidate)", "service"):
            rollout(base, body={"candidate": tag}).raise_for_status()
        with steps.step("shadow under load", "service"):
            result["shadow"] = wrk_phase(base, bodies, pid, args.seconds)
        result["shadow_figures"] = rollout(base).json()["rollouts"][0]
        with steps.step("canary 10% under load", "service"):
            rollout(base, body={"candidate": tag, "percent": 10}).raise_for_status()
            result["canary"] = wrk_phase(base, bodies, pid, args.seconds)
        promoted = {}

        def promote():
            promoted["answer"] = rollout(base, "/promote")
            promoted["at"] = time.perf_counter()

        with steps.step("promote under load", "service"):
            result["promote"] = wrk_phase(base, bodies, pid, args.seconds, promote)
        if promoted["answer"].status_code != 200:
            raise SystemExit(f"error: promotion refused: {promoted['answer'].text}")
        result["loop_seconds"] = promoted["at"] - loop_start
        # What shadow costs: the promoted model alone, then with the version it replaced as its
        # shadow, in turn, --rounds times: the same load, the same live model, one process.
        replaced = result["shadow_figures"]["live"]["tag"]
        result["cost"] = {"off": [], "shadow": []}
        for _ in range(args.rounds):
            result["cost"]["off"].append(wrk_phase(base, bodies, pid, args.seconds))
            rollout(base, body={"candidate": replaced}).raise_for_status()
            result["cost"]["shadow"].append(wrk_phase(base, bodies, pid, args.seconds))
            rollout(base, "/rollback").raise_for_status()
        result["after"] = {
            "shifted": accuracy(graph, shifted, truth_eval),
            "original": accuracy(graph, original, truth_eval),
        }
        result["candidate"] = tag

        # The broken candidate: the same reviewed images with their labels shuffled, no replay.
        broken_dir = workdir / "shuffled"
        rng = np.random.default_rng(0)
        files = sorted(
            p for p in reviewed.rglob("*.jpg") if p.parent.name in {folder_name(c) for c in FASHION_MNIST_CLASSES}
        )
        for path, label in zip(files, rng.permutation([p.parent.name for p in files])):
            (broken_dir / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, broken_dir / label / path.name)
        with steps.step("broken candidate: finetune on shuffled labels, export, register", "command"):
            finetune(env, broken_dir, workdir / "broken", "--replay-ratio", "0")
            command(
                env,
                "-m",
                "export",
                "--checkpoint",
                str(workdir / "broken" / "last.pt"),
                "--output",
                str(workdir / "broken.onnx"),
            )
            broken = command(
                env, "-m", "model_store", "register", str(workdir / "broken.onnx"), "--name", "fashion-lenet"
            ).split()[1]
        rollout(base, body={"candidate": broken}).raise_for_status()
        result["broken_shadow"] = wrk_phase(base, bodies, pid, args.seconds)
        refused = rollout(base, "/promote")
        result["broken_promotion"] = {"status": refused.status_code, "error": refused.json().get("error")}
        rollout(base, body={"candidate": broken, "percent": 50}).raise_for_status()
        result["broken_canary"] = wrk_phase(base, bodies, pid, args.seconds)
        state = rollout(base).json()
        result["broken_end"] = (
            state["ended"]["fashion-lenet"][0] if not state["rollouts"] else {"ended": "still running"}
        )
        result["serving_after_broken"] = httpx.get(f"{base}/models", headers=AUTH, timeout=30).json()["default"]
        result["steps"] = steps.rows
    return result


def table(result: dict, args, command_line: str) -> str:
    b, a = result["before"], result["after"]
    gap_before = b["original"]["accuracy"] - b["shifted"]["accuracy"]
    gap_after = a["original"]["accuracy"] - a["shifted"]["accuracy"]
    closed = 1 - gap_after / gap_before
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command_line}`.",
        "",
        "| | shipped LeNet | fine-tuned candidate |",
        "|---|---|---|",
        f"| accuracy on the new catalogue (test images 5,000-9,999 on white) | {b['shifted']['accuracy']:.4f} | {a['shifted']['accuracy']:.4f} |",
        f"| accuracy on the original test images 5,000-9,999 | {b['original']['accuracy']:.4f} | {a['original']['accuracy']:.4f} |",
        f"| unsure share, new catalogue | {b['shifted']['unsure']:.3f} | {a['shifted']['unsure']:.3f} |",
        f"| unsure share, original | {b['original']['unsure']:.3f} | {a['original']['unsure']:.3f} |",
        "",
        f"Labels used: {result['labels']:,}. Gap between original and new-catalogue accuracy: {gap_before:.4f} before, "
        f"{gap_after:.4f} after: **{closed:.0%} of it closed** (goal: two thirds). Original test accuracy "
        f"{a['original']['accuracy'] - b['original']['accuracy']:+.4f} (goal: within 0.01). "
        f"The stream: {result['stream']['answers']:,} photos, {result['stream']['unsure']:.1%} answered unsure, "
        f"{result['stream']['accuracy']:.1%} right. Fine-tune: {'; '.join(result['finetune'])}.",
        "",
        f"**From the first captured image to the promotion: {result['loop_seconds']:.0f} s** (goal: 10 minutes), less "
        "the no-rollout load run between the review and the export, which is the benchmark's, not the loop's.",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
        *(f"| {row['step']} | {row['seconds']:.1f} | {row['cpu_s']:.1f} |" for row in result["steps"]),
        "",
        f"Live traffic under wrk at concurrency {CONCURRENCY} (half original images, half the new catalogue, 112 px "
        f"JPEGs), {args.seconds:g} s per phase:",
        "",
        "| phase | requests/s | p50 ms | p99 ms | failed | server CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, key in (
        ("no rollout", "baseline"),
        ("shadow", "shadow"),
        ("canary 10%", "canary"),
        ("promotion (switch halfway)", "promote"),
        ("broken candidate, shadow", "broken_shadow"),
        ("broken candidate, canary 50% until its gate", "broken_canary"),
    ):
        r = result[key]
        lines.append(
            f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['server_cpu_ms']:.2f} |"
        )
    off = [r["server_cpu_ms"] for r in result["cost"]["off"]]
    on = [r["server_cpu_ms"] for r in result["cost"]["shadow"]]
    ratios = [b / a for a, b in zip(off, on)]
    lines += [
        "",
        f"What shadow costs: the promoted model alone, then with the version it replaced as its shadow, in turn, "
        f"{len(off)} rounds of {args.seconds:g} s at concurrency {CONCURRENCY}. Server CPU per request "
        f"{statistics.median(off):.2f} ms alone, {statistics.median(on):.2f} ms with its shadow (medians): "
        f"**{statistics.median(ratios):.2f}x** (rounds: {', '.join(f'{x:.2f}x' for x in ratios)}; goal: at most 1.6x); "
        f"p99 {statistics.median(r['p99'] for r in result['cost']['off']):.1f} ms alone, "
        f"{statistics.median(r['p99'] for r in result['cost']['shadow']):.1f} ms with its shadow.",
    ]
    shadow = result["shadow_figures"]
    end = result["broken_end"]
    lines += [
        "",
        f"Shadow figures: {shadow['scored_by_both']:,} images scored by both, agreement on the live model's sure answers "
        f"{shadow['agreement_on_sure']:.3f} of {shadow['live_sure']:,}; unsure share live {shadow['live']['unsure_share']:.3f}, "
        f"candidate {shadow['candidate']['unsure_share']:.3f}.",
        f"Broken candidate: promotion answered {result['broken_promotion']['status']} "
        f'("{result["broken_promotion"]["error"]}"); on canary it ended **{end["ended"]}** ({end.get("why", "")}); '
        f"the service then served {result['serving_after_broken']}.",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loop-")))
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, args)
    text = table(result, args, "python -m benchmarks.loop" + (f" --write {args.write}" if args.write else ""))
    print(text)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, default=str)[:2000])
    if args.write:
        write_section(args.write, SECTION, text, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

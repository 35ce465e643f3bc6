"""The floor: the least a Python server can do per request. Bare Starlette on uvicorn (uvloop,
httptools, no access log): parse the multipart form, decode, one ONNX Runtime call at batch 1 on
the event loop, JSON. No batching, limits, auth, metrics or logs.

    FLOOR_ONNX=model_store/default/fashion-lenet.onnx uvicorn benchmarks.starlette_floor:app --port 8001 \\
        --no-access-log --loop uvloop --http httptools

``benchmarks.serving_compare`` measures the service against it: what the service's own
features cost per request is the distance to this floor. With ``FLOOR_DECODE=naive`` it decodes as
a user would write it, ``Image.open(...).convert(...).resize(...)``: every pixel, then the card's
size (``benchmarks.photo_serving``); by default as the service does (``image_bytes_to_input``).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.peers import naive_input
from model_store import ImageError, image_bytes_to_input
from model_store.card import ONNX_METADATA_KEY, ModelCard

if "FLOOR_ONNX" not in os.environ:
    raise SystemExit("set FLOOR_ONNX to an ONNX file written by `python -m export`")
options = ort.SessionOptions()
options.intra_op_num_threads = 1  # batch 1 of a small model: one thread is fastest, and never spins
session = ort.InferenceSession(os.environ["FLOOR_ONNX"], options, providers=["CPUExecutionProvider"])
card = ModelCard.from_json(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
input_name = session.get_inputs()[0].name


to_pixels = naive_input if os.environ.get("FLOOR_DECODE") == "naive" else image_bytes_to_input


async def classify(request: Request) -> JSONResponse:
    form = await request.form()
    try:
        pixels = to_pixels(await form["image"].read(), card)
    except (KeyError, AttributeError, ImageError) as err:
        return JSONResponse({"error": str(err)}, status_code=400)
    finally:
        await form.close()
    logits = session.run(None, {input_name: pixels[None]})[0][0]
    index = int(np.argmax(logits))
    probability = float(np.exp(logits[index] - logits.max()) / np.exp(logits - logits.max()).sum())
    return JSONResponse({"label": card.class_names[index], "index": index, "probability": probability})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/healthz", healthz)])

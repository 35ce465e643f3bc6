"""The server people write by hand: FastAPI + PyTorch eager, one image per request, no batching.

    BASELINE_CHECKPOINT=runs/default/last.pt uvicorn benchmarks.fastapi_baseline:app --port 8000
    curl -F image=@shoe.png http://127.0.0.1:8000/classify

The baseline that ``benchmarks/serving_compare.py`` measures the BentoML service against. The
checkpoint is one written by ``training.checkpoint.save_checkpoint`` (state_dict + card). It uses
the project's own preprocessing, so the two servers differ only in how they serve, not in what;
with ``BASELINE_DECODE=naive``, decoding as a user would write it (``benchmarks.peers.naive_input``).
"""

from __future__ import annotations

import os
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, UploadFile

from benchmarks.peers import naive_input
from model_store import ImageError, image_bytes_to_input
from training.checkpoint import load_model

if "BASELINE_CHECKPOINT" not in os.environ:
    raise SystemExit("set BASELINE_CHECKPOINT to a checkpoint written by training.checkpoint.save_checkpoint")
torch.set_num_threads(os.cpu_count())
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model, card, _ = load_model(os.environ["BASELINE_CHECKPOINT"])  # eager: loaded at import, before serving
model = model.to(device)
to_pixels = naive_input if os.environ.get("BASELINE_DECODE") == "naive" else image_bytes_to_input
app = FastAPI()


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


# A plain def: FastAPI runs it in its thread pool, so requests overlap where PIL and torch release the GIL.
@app.post("/classify")
def classify(image: Annotated[UploadFile, File()]) -> dict:
    try:
        pixels = to_pixels(image.file.read(), card)
    except ImageError as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(pixels)[None].to(device)), dim=1)[0]
    index = int(probabilities.argmax())
    return {"label": card.class_names[index], "index": index, "probability": float(probabilities[index])}

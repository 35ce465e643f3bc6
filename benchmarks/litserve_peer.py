"""LitServe serving the same ONNX graph with its own batching: the peer a user would pick instead.

    LITSERVE_ONNX=model_store/default/fashion-lenet.onnx LITSERVE_BATCH_TIMEOUT=0.005 \\
        python -m benchmarks.litserve_peer --port 8002

Set up as LitServe's docs advise for throughput: ``max_batch_size=64``, a ``batch_timeout``, one
inference worker and one API server (one model copy, as the service has), ZeroMQ queues
(``fast_queue``). Decoding uses the project's ``image_bytes_to_input``, so only the serving differs.
With ``LITSERVE_STATS`` set, the worker writes ``{"batches": n, "images": m}`` there once a second,
for the mean batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import litserve as ls
import numpy as np
from fastapi import HTTPException

from model_store import ImageError, image_bytes_to_input
from model_store.card import ONNX_METADATA_KEY, ModelCard
from model_store.engine import softmax


class OnnxClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service runs it
        self.session = ort.InferenceSession(os.environ["LITSERVE_ONNX"], options, providers=["CPUExecutionProvider"])
        self.card = ModelCard.from_json(self.session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
        self.input_name = self.session.get_inputs()[0].name
        self.stats_path, self.batches, self.images, self.written = os.environ.get("LITSERVE_STATS"), 0, 0, 0.0

    def decode_request(self, request) -> np.ndarray:
        try:
            return image_bytes_to_input(request["image"].file.read(), self.card)
        except (KeyError, AttributeError, ImageError) as err:
            raise HTTPException(400, str(err)) from None

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        probabilities = softmax(self.session.run(None, {self.input_name: batch})[0])
        self.batches, self.images = self.batches + 1, self.images + len(batch)
        if self.stats_path and time.monotonic() - self.written > 1:
            with open(self.stats_path + ".tmp", "w") as out:
                json.dump({"batches": self.batches, "images": self.images}, out)
            os.replace(self.stats_path + ".tmp", self.stats_path)
            self.written = time.monotonic()
        return probabilities

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        index = int(probabilities.argmax())
        return {"label": self.card.class_names[index], "index": index, "probability": float(probabilities[index])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="LitServe peer for benchmarks/serving_compare.py")
    parser.add_argument("--port", type=int, default=8002, help="port (default: 8002)")
    args = parser.parse_args()
    api = OnnxClassifierAPI(
        max_batch_size=64, batch_timeout=float(os.environ.get("LITSERVE_BATCH_TIMEOUT", "0.005")), api_path="/classify"
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)

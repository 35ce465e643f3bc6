"""What an operator can set: every serving limit and choice, read once from the environment.

Each field has one ``SERVING_*`` variable (see ``ENV``); a bad value stops the service at start
with a message naming the variable, the value and what is allowed, rather than surfacing later as
a failed request. The README's table of limits is this file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from model_store.preprocess import HEAP_PAD_BYTES
from model_store.store import SHIPPED_MODELS

DEVICES = ("auto", "cpu", "cuda")
RENAMED = {"SERVING_DECODE_THREADS": "SERVING_DECODE_WORKERS"}
# Start-up resident sizes, measured (RSS after warm-up): a service worker with BentoML, ONNX Runtime
# and the shipped LeNet ~150 MB, counted double for a larger model's arena; a decoder process ~40 MB.
WORKER_START_MB, DECODER_START_MB = 300, 40  # decodes moved from threads to processes
KEPT_MB = HEAP_PAD_BYTES // 2**20  # freed memory a worker and each decoder keep for the next image


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the container's CPU quota (cgroup v2 ``cpu.max``, or v1's CFS
    quota), rounded up, else the CPUs it is pinned to. ``os.cpu_count()`` is the host's, which in a
    pod limited to 2 CPUs on a 64-core node would start 64 decoders and 64 compute threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (cgroup / quota_file).read_text().split()
            quota, period = text[0], (cgroup / period_file).read_text().strip() if period_file else text[1]
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1"):
            return max(1, min(cpus, math.ceil(int(quota) / int(period))))
        break
    return max(1, cpus)


@dataclass(frozen=True)
class ServingConfig:
    models: tuple[str, ...] = tuple(f"{name}:latest" for name in SHIPPED_MODELS)  # store tags; the first is the default
    device: str = "auto"  # auto: CUDA when this onnxruntime build has it; cuda: the same, but a fallback is an error in the logs and /models
    max_batch_size: int = 64  # images per ONNX Runtime call
    batch_wait_ms: float = 0.0  # extra time every batch waits to fill; 0: none (but see batch_fill_ms)
    batch_fill_ms: float = 5.0  # longest a small batch waits to fill while the loop is saturated and requests overlap (serving.batching); 0: never
    max_body_bytes: int = 10 * 1024 * 1024  # request body limit -> 413
    max_pixels: int = 40_000_000  # width x height limit, checked from the header before decoding -> 400
    max_decode_mb: int = 512  # estimated peak memory of one decode, checked from the header -> 400; also each decoder's hard memory limit
    decode_timeout_s: float = 5.0  # one image's decode; past it the decoder process is killed and replaced -> 400
    max_batch_images: int = 64  # images in one /classify_batch request -> 400
    max_concurrency: int = 256  # classify requests in flight; beyond -> 503 with Retry-After
    timeout_s: float = 10.0  # per classify request: for its body to arrive (-> 408), then for its answer (-> 504)
    min_body_rate: int = 8192  # bytes/s a body must keep up after its first 2 s, or it is cut -> 408
    max_body_memory_mb: int = 512  # request bodies held in memory at once, all requests together; beyond -> 503
    auth_token: str = ""  # when set, every path but the open ones (serving.edge.OPEN_PATHS: probes, /metrics, docs, /ui) needs "Authorization: Bearer <token>"
    decode_workers: int = (
        available_cpus()
    )  # decoder processes (per service worker) for images too large to decode inline
    ort_threads: int = (
        0  # ONNX Runtime intra-op threads on CPU, per worker; 0: the container's CPUs shared among the workers
    )
    log_requests: bool = True  # one JSON log line per classify request
    tracing: bool = False  # OpenTelemetry spans for classify requests, through BentoML's request layer (exporter: BentoML's tracing config)
    model_control: bool = (
        False  # POST /v2/repository/...: load and unload models at run time (needs the token when one is set)
    )
    workers: int = 1  # service processes, each with its own copy of the models and its own batches
    grpc_port: int = 8001  # the Open Inference Protocol over gRPC (serving.grpc_server), on HTTP's host; 0: off
    grpc_stream_window: int = 64  # messages a ModelStreamInfer stream has in flight at most; 1: one at a time
    capture: str = ""  # where to keep unsure answers' images for review (serving.capture): a folder or s3://bucket/prefix; empty: off
    capture_sample: float = 0.01  # share of sure answers kept too, at random, so that labels measure live accuracy
    capture_rate: float = 10.0  # captures taken per second and worker, at most; past it they are dropped and counted
    capture_max_images: int = (
        10_000  # per model in the store; past it (or capture_max_mb) the oldest unlabelled is evicted
    )
    capture_max_mb: int = 1024  # bytes of images per model in the store
    capture_queue_mb: int = 64  # captures waiting for the writer, per worker; past it they are dropped and counted
    review_tokens: str = (
        ""  # name=token,...: bearer tokens for /review and /models only; a label records the token's name
    )
    rollout_state: str = (
        ""  # the file rollouts keep their state in (serving.rollout); empty: rollout.json in BENTOML_HOME
    )
    rollout_min_requests: int = 200  # images scored by both versions before a gate judges (rollback, promotion)
    rollout_unsure_margin: float = 0.10  # a canary rolls back when its unsure share exceeds the live one's by more
    rollout_error_margin: float = 0.01  # ... or its error rate by more than this
    rollout_min_agreement: float = 0.90  # promotion needs the candidate to agree with this share of live sure answers
    rollout_shadow_max: int = 64  # shadow scores in flight at most; past it one is skipped and counted

    def __post_init__(self) -> None:
        if not self.models or any(not tag.strip() for tag in self.models):
            raise ValueError(f"SERVING_MODELS must list at least one model tag, got {','.join(self.models)!r}")
        if self.device not in DEVICES:
            raise ValueError(f"SERVING_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in (
            "max_batch_size",
            "max_body_bytes",
            "max_pixels",
            "max_batch_images",
            "max_concurrency",
            "max_decode_mb",
            "min_body_rate",
            "max_body_memory_mb",
            "decode_workers",
            "workers",
            "grpc_stream_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV[name]} must be at least 1, got {getattr(self, name)}")
        for name in ("rollout_unsure_margin", "rollout_error_margin", "rollout_min_agreement"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{ENV[name]} must be a share between 0 and 1, got {getattr(self, name)}")
        for name in (
            "capture_max_images",
            "capture_max_mb",
            "capture_queue_mb",
            "rollout_min_requests",
            "rollout_shadow_max",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV[name]} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.capture_sample <= 1:
            raise ValueError(f"SERVING_CAPTURE_SAMPLE must be a share between 0 and 1, got {self.capture_sample}")
        if not 0 < self.capture_rate < math.inf:
            raise ValueError(
                f"SERVING_CAPTURE_RATE must be a positive number of captures a second, got {self.capture_rate}"
            )
        if self.review_tokens and not self.auth_token:
            raise ValueError("SERVING_REVIEW_TOKENS needs SERVING_AUTH_TOKEN: without it no path asks for a token")
        self.reviewers  # checks SERVING_REVIEW_TOKENS
        if self.capture:
            from model_store.captures import CaptureStore
            from model_store.errors import UsageError

            try:
                CaptureStore(self.capture)  # opens no connection: a store that is down is counted, not fatal
            except UsageError as err:
                raise ValueError(f"SERVING_CAPTURE: {err}") from None
        for name in ("batch_wait_ms", "batch_fill_ms", "ort_threads"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{ENV[name]} must be 0 or more, got {getattr(self, name)}")
        for name in ("timeout_s", "decode_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:  # inf would turn the limit off; nan fails any comparison
                raise ValueError(f"{ENV[name]} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_body_memory_mb * 2**20 < self.max_body_bytes:
            raise ValueError(
                f"SERVING_MAX_BODY_MEMORY_MB ({self.max_body_memory_mb}) must hold at least one body of "
                f"SERVING_MAX_BODY_BYTES ({self.max_body_bytes:,} bytes)"
            )
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(
                f"SERVING_GRPC_PORT must be a TCP port (1 to 65535), or 0 for no gRPC; got {self.grpc_port}"
            )
        if self.model_control and self.workers > 1:
            # A load or unload reaches one worker: the others would go on serving the old set.
            raise ValueError("SERVING_MODEL_CONTROL needs SERVING_WORKERS=1: a load or unload reaches only one worker")
        if self.auth_token and not all(33 <= ord(c) < 127 for c in self.auth_token):
            # RFC 6750's token characters: a blank or spaced token would never match a header
            raise ValueError("SERVING_AUTH_TOKEN must be printable ASCII without spaces")

    @property
    def reviewers(self) -> dict[str, str]:
        """The /review-only tokens, by token: their names."""
        found = {}
        for entry in filter(None, (e.strip() for e in self.review_tokens.split(","))):
            name, _, token = entry.partition("=")
            if not name or not token or not all(33 <= ord(c) < 127 and c not in ",=" for c in name + token):
                raise ValueError(
                    f"SERVING_REVIEW_TOKENS must be name=token pairs separated by commas, printable ASCII without "
                    f"spaces; got an entry of {len(entry)} characters that is not"  # never echo a token
                )
            if name == "service":  # the name labels record for SERVING_AUTH_TOKEN
                raise ValueError(
                    "SERVING_REVIEW_TOKENS: 'service' is the name of SERVING_AUTH_TOKEN; give the reviewer another"
                )
            if token == self.auth_token or token in found:
                raise ValueError(
                    f"SERVING_REVIEW_TOKENS gives {name!r} a token that another name or SERVING_AUTH_TOKEN has"
                )
            found[token] = name
        return found

    @property
    def engine_threads(self) -> int:
        """Intra-op threads for each ONNX Runtime session: as set, or the cores divided among the
        workers, so that workers do not run more compute threads than there are cores."""
        return self.ort_threads or max(1, available_cpus() // self.workers)

    @property
    def grpc_calls(self) -> int:
        """gRPC calls at once per worker (``serving.grpc_server``): as many messages at the body
        limit as the body budget holds, at least one, at most SERVING_MAX_CONCURRENCY."""
        return min(max(1, self.max_body_memory_mb * 2**20 // self.max_body_bytes), self.max_concurrency)

    @property
    def grpc_stream_bytes(self) -> int:
        """Bytes of messages a ModelStreamInfer stream may have in flight before it reads another
        (``serving.grpc_server.StreamWindow``): an eighth of the message limit, so that a stream,
        one of the calls, holds at most that much more than a call does."""
        return max(1, self.max_body_bytes // 8)

    @property
    def memory_bound_mb(self) -> int:
        """Peak memory of one service worker and its decoders (README, "Limits"): what clients can
        make it hold is bounded by the body budget and, per decoder, the decode limit."""
        decoder = DECODER_START_MB + KEPT_MB + self.max_decode_mb
        capture = self.capture_queue_mb if self.capture else 0  # bodies kept past their request, for the writer
        # gRPC calls: at most max_body_memory_mb of messages at once (serving.grpc_server), each held
        # twice while it is parsed (gRPC's buffer, then the message); a call that is a stream holds
        # its window more, also twice: at most 2.25 times the budget in all
        streams = self.grpc_calls * self.grpc_stream_bytes / 2**20
        grpc = 2 * (self.max_body_memory_mb + streams) if self.grpc_port else 0
        return (
            WORKER_START_MB + KEPT_MB + self.max_body_memory_mb + round(grpc) + capture + self.decode_workers * decoder
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServingConfig:
        for old, new in RENAMED.items():
            if old in environ:
                raise ValueError(f"{old} was renamed {new}; set that instead")
        values = {}
        for field in fields(cls):
            raw = environ.get(ENV[field.name])
            if raw is None:
                continue
            if not raw.strip():  # set but blank: for the token, silently serving without auth is the danger
                raise ValueError(f"{ENV[field.name]} is set but blank; unset it for the default, or give a value")
            values[field.name] = _parse(field.name, field.type, raw.strip())
        return cls(**values)


ENV = {field.name: f"SERVING_{field.name.upper()}" for field in fields(ServingConfig)}


def _parse(name: str, kind: str, raw: str):
    try:
        if kind == "tuple[str, ...]":
            return tuple(tag.strip() for tag in raw.split(","))
        if kind == "bool":
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        return {"int": int, "float": float, "str": str}[kind](raw)
    except ValueError:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(kind, kind)
        raise ValueError(f"{ENV[name]} must be {expected}, got {raw!r}") from None

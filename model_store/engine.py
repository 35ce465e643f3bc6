"""The inference engine: an ONNX Runtime session over an exported graph, shared by the HTTP
service (``/classify``, ``/classify_batch``, ``/explain`` and the v2 protocol), the offline scorer and
the model store's own check of a graph against its card. Takes uint8 inputs, returns class
probabilities, calibrated with the card's temperature when it has one, and ranks them (:func:`rank`)
the one way every answer uses.

It sits in model_store, under both applications: it needs only onnxruntime, numpy and the card.
The temperature is applied here, not inside the graph: the graph stays the network export verified
against PyTorch, logit for logit, and the one place that turns logits into probabilities serves
every route alike. It costs a division and a log-sum-exp per row, next to the softmax it was already
computing."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from model_store import drift
from model_store.calibration import Calibration, scores
from model_store.card import ONNX_METADATA_KEY, ModelCard
from model_store.errors import UsageError

logger = logging.getLogger(__name__)

GPU_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
CAM_OUTPUT = "cam"  # export.cam.CAM_OUTPUT_NAME; serving does not import export
# The out-of-distribution head export.ood_head adds: each image's distance to its k-th nearest
# held-out image in feature space [N], and those penultimate features [N, D] for drift.
OOD_OUTPUT, FEATURES_OUTPUT = "ood_distance", "features"


# Heuristic cuDNN algorithm search: exhaustive search re-runs for every new batch shape, which the
# adaptive batcher produces many of; the heuristic choice is within a few percent for these convnets.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}


def providers_for(device: str = "auto") -> list:
    """ONNX Runtime providers for ``device``: auto and cuda ask for CUDA when this build has it."""
    if device == "cpu" or (device == "auto" and GPU_PROVIDER not in ort.get_available_providers()):
        return [CPU_PROVIDER]
    return [(GPU_PROVIDER, CUDA_OPTIONS), CPU_PROVIDER]


INPUT_TYPES = ("tensor(uint8)", "tensor(float)")  # raw pixels, or pixels the caller normalized with the card


def graph_name(path: str | os.PathLike | bytes) -> str:
    """How errors and logs name a graph: its path, or its size when it came as bytes."""
    return f"a graph of {len(path):,} bytes" if isinstance(path, bytes) else str(path)


def open_session(path: str | os.PathLike | bytes, options=None, providers=(CPU_PROVIDER,)) -> ort.InferenceSession:
    """A session over the graph's bytes, which can reach no weights outside the graph.

    The store copies ``model.onnx`` alone, so a graph that keeps its weights in external data files
    beside it must be refused. Loaded from bytes, ONNX Runtime (1.31) looks for external data in the
    working directory, where such a file may well be: point it at an empty folder instead.
    """
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise UsageError(f"{path} does not exist")
    graph = path if isinstance(path, bytes) else Path(path).read_bytes()
    options = options or ort.SessionOptions()
    with tempfile.TemporaryDirectory() as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(graph, options, providers=list(providers))
        except Exception as err:  # ORT raises its own Fail / InvalidProtobuf types
            error = err
    if isinstance(path, bytes):
        raise UsageError(f"{graph_name(path)} is not a loadable ONNX model: {one_line(error)}") from None
    try:
        ort.InferenceSession(str(path), providers=[CPU_PROVIDER])
    except Exception as err:
        raise UsageError(f"{path} is not a loadable ONNX model: {one_line(err)}") from None
    raise UsageError(
        f"{path} keeps its weights in external data files beside it, which the model store does not copy; "
        f"save it as a single file first, e.g. `python -c \"import onnx; onnx.save(onnx.load('{path}'), "
        f"'single.onnx')\"` (the onnx package comes with the train extra)"
    )


def card_in(session: ort.InferenceSession, name: str) -> ModelCard:
    """The card in a graph's metadata: the one place a card is read from a graph."""
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in props:
        raise UsageError(f"{name} carries no {ONNX_METADATA_KEY!r} metadata; export it with `python -m export`")
    try:
        return ModelCard.from_json(props[ONNX_METADATA_KEY])
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None


def drift_reference_in(session: ort.InferenceSession, name: str) -> drift.DriftReference | None:
    """The drift reference export wrote beside the card, or None for a graph exported without one."""
    props = session.get_modelmeta().custom_metadata_map
    if drift.ONNX_METADATA_KEY not in props:
        return None
    try:
        return drift.DriftReference.from_json(props[drift.ONNX_METADATA_KEY])
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class Scored(NamedTuple):
    """One image's outcome: what ``answer`` turns into its part of a response."""

    probabilities: np.ndarray  # [classes], calibrated
    energy: float  # -logsumexp(logits / temperature): higher is less familiar
    distance: float | None = None  # to the k-th nearest held-out image's features; None: no OOD head


class Outcomes(NamedTuple):
    """A batch's outcomes as arrays: :class:`Scored` per row, and the features drift compares."""

    probabilities: np.ndarray  # [N, classes], calibrated
    energies: np.ndarray  # [N]
    distances: np.ndarray | None = None  # [N]; None: the graph has no OOD head
    features: np.ndarray | None = None  # [N, D] penultimate features; None: likewise

    @classmethod
    def empty(cls, classes: int, has_ood: bool) -> Outcomes:
        """No rows: what a batch of images that all failed to decode scores."""
        distances, features = (np.empty(0, np.float32), np.empty((0, 0), np.float32)) if has_ood else (None, None)
        return cls(np.empty((0, classes), np.float32), np.empty(0, np.float32), distances, features)

    def rows(self) -> list[Scored]:
        distances = [None] * len(self.energies) if self.distances is None else self.distances.tolist()
        return [Scored(p, e, d) for p, e, d in zip(self.probabilities, self.energies.tolist(), distances)]


class OnnxClassifier:
    """An exported classifier: ``predict(uint8 [N, C, H, W]) -> float32 probabilities [N, classes]``,
    ``score`` the same as one :class:`Scored` per image.

    ``provider_error`` is set when a GPU was asked for (``device="cuda"``, or ``"auto"`` with an
    onnxruntime-gpu build) and ONNX Runtime fell back to the CPU: the caller must say so loudly.
    """

    def __init__(self, path: str | os.PathLike | bytes, device: str = "auto", threads: int = 0):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: one per core
        # ORT's pool threads otherwise spin for a while after each run, waiting for the next: under
        # steady load that burnt 42% of the service's CPU, stolen from decoding and HTTP.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers_for(device)
        self.name = graph_name(path)
        # bytes: the graph itself, as a Ray actor on another machine receives it
        self.session = open_session(path, options, providers)
        self.card = card_in(self.session, self.name)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        # A graph exported with --float-input leaves normalization to its caller: do it here, with
        # the card's mean and std (the same numbers the uint8 graphs carry inside).
        self.normalize = graph_input.type == "tensor(float)"
        mean, std = (np.array(v, np.float32).reshape(1, -1, 1, 1) for v in (self.card.mean, self.card.std))
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self.output_name = self.session.get_outputs()[0].name
        outputs = {o.name for o in self.session.get_outputs()}
        # Export records a class-activation map output in the card (``--cam``); older graphs have none.
        self.has_cam = bool(self.card.export.get("cam"))
        if self.has_cam and CAM_OUTPUT not in outputs:
            raise UsageError(f"{self.name}: its card says it has a {CAM_OUTPUT!r} output, the graph has none")
        # A card with a kNN threshold judges out-of-distribution by the graph's distance output
        # (export.ood_head); older cards by the energy of the logits alone.
        calibration = self.card.calibration
        self.has_ood = calibration is not None and calibration.knn_threshold is not None
        if self.has_ood and not {OOD_OUTPUT, FEATURES_OUTPUT} <= outputs:
            raise UsageError(
                f"{self.name}: its card has a knn_threshold, so the graph needs the outputs {OOD_OUTPUT!r} and "
                f"{FEATURES_OUTPUT!r}; it has {sorted(outputs)}"
            )
        self.outputs = [self.output_name, *((OOD_OUTPUT, FEATURES_OUTPUT) if self.has_ood else ())]
        self.drift_reference = drift_reference_in(self.session, self.name) if self.has_ood else None
        self.temperature = self.card.calibration.temperature if self.card.calibration else 1.0
        self.provider = self.session.get_providers()[0]
        self.provider_error = None
        wanted_gpu = device == "cuda" or providers[0] != CPU_PROVIDER
        if wanted_gpu and self.provider != GPU_PROVIDER:
            self.provider_error = (
                f"a GPU was requested (device={device!r}) but ONNX Runtime is running on {self.provider}; "
                f"this build offers {', '.join(ort.get_available_providers())} (CUDAExecutionProvider needs "
                "onnxruntime-gpu, a visible GPU and matching CUDA/cuDNN libraries)"
            )
            logger.error("%s", self.provider_error)
        logger.info("loaded %s (%s, %d classes) on %s", self.name, self.card.arch, self.card.num_classes, self.provider)

    def check(self) -> ModelCard:
        """The card, once the graph shows that it agrees with it: the card's class count is the
        graph's output width and its channels, height and width the graph's input shape (symbolic
        dimensions such as the batch pass); the input is uint8 or float; and one image of zeros gives
        finite scores for every class. A UsageError names the graph, the card's value and the graph's.
        The model store runs it on every graph it registers, the service on every model it loads."""
        card, name = self.card, self.name
        graph_input, graph_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        expected = (card.in_channels, card.height, card.width)
        if len(graph_input.shape) != 4 or any(
            isinstance(dim, int) and dim != value for dim, value in zip(graph_input.shape[1:], expected)
        ):
            raise UsageError(
                f"{name}: the card's input is [N, {', '.join(map(str, expected))}] (in_channels, height, width) "
                f"but the graph's input {graph_input.name!r} has shape {graph_input.shape}"
            )
        if graph_input.type not in INPUT_TYPES:
            raise UsageError(
                f"{name}: the graph's input {graph_input.name!r} is {graph_input.type}; "
                f"the service feeds one of {', '.join(INPUT_TYPES)}"
            )
        width = graph_output.shape[-1] if graph_output.shape else None
        if len(graph_output.shape) != 2 or (isinstance(width, int) and width != card.num_classes):
            raise UsageError(
                f"{name}: the card has {card.num_classes} class names but the graph's output {graph_output.name!r} "
                f"has shape {graph_output.shape}, expected [N, {card.num_classes}]"
            )
        zeros = np.zeros((1, *expected), np.uint8)
        try:
            logits = self.logits(zeros)
        except Exception as err:  # ORT raises its own Fail / InvalidArgument types
            raise UsageError(
                f"{name}: a test run on zeros of shape {list(zeros.shape)} failed: {one_line(err)}"
            ) from None
        if logits.shape != (1, card.num_classes) or not np.isfinite(logits).all():
            raise UsageError(
                f"{name}: a test run on zeros gave {logits.dtype} scores of shape {list(logits.shape)} "
                f"(finite: {bool(np.isfinite(logits).all())}); the card's {card.num_classes} classes need "
                f"finite scores of shape [1, {card.num_classes}]"
            )
        reference = self.drift_reference
        if reference is not None:
            features = self.run(zeros, [FEATURES_OUTPUT])[0]
            if reference.classes != card.num_classes or features.shape != (1, reference.features):
                raise UsageError(
                    f"{name}: its drift reference is for {reference.classes} classes and {reference.features} "
                    f"features; the card has {card.num_classes} classes and the graph gives features of shape "
                    f"{list(features.shape)}"
                )
        return card

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, classes]."""
        return self.outcomes(pixels).probabilities

    def score(self, pixels: np.ndarray) -> list[Scored]:
        """Each image's :class:`Scored`: the batcher's unit of work."""
        return self.outcomes(pixels).rows()

    def outcomes(self, pixels: np.ndarray, batch_size: int | None = None) -> Outcomes:
        """:meth:`score` as arrays: the batch scorer's unit of work, with no Python object per
        image, and the service's drift window's (``serving.monitor``). ``batch_size``: as :meth:`run`."""
        return self.outcomes_of(self.run(pixels, self.outputs, batch_size))

    def outcomes_of(self, outputs: list[np.ndarray]) -> Outcomes:
        """The :class:`Outcomes` of the graph's outputs ``self.outputs`` (logits first)."""
        probabilities, energies = scores(outputs[0], self.temperature)
        return Outcomes(probabilities, energies, *outputs[1:3]) if self.has_ood else Outcomes(probabilities, energies)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The graph's float32 logits [N, classes], before any calibration."""
        return self.run(pixels, [self.output_name])[0]

    def run(self, pixels: np.ndarray, names: list[str], batch_size: int | None = None) -> list[np.ndarray]:
        """The graph's outputs ``names`` for uint8 ``pixels`` (normalized first for a float-input
        graph). By name: a graph with a class-activation map would otherwise compute and copy it too.
        With ``batch_size``, run that many images at a time and concatenated: a whole dataset's
        activations at once would not fit."""
        if batch_size is not None and len(pixels) > batch_size:
            parts = [self.run(pixels[i : i + batch_size], names) for i in range(0, len(pixels), batch_size)]
            return [np.concatenate([part[j] for part in parts]) for j in range(len(names))]
        feed = self._feed(pixels)
        if self.provider == GPU_PROVIDER:
            # I/O binding: one host->device copy of the batch and the outputs allocated on the device,
            # instead of ORT staging both through its own CPU buffers on every call.
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, feed)
            for name in names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return self.session.run(names, {self.input_name: feed})

    def explain(self, pixels: np.ndarray) -> tuple[list[Scored], np.ndarray]:
        """Each image's :class:`Scored` and the class-activation map of its top class, float32
        [N, H, W] in logit units; only for a graph exported with ``--cam`` (see ``has_cam``)."""
        if not self.has_cam:
            raise ValueError(f"model {self.card.arch!r} was exported without a class-activation map")
        logits, cam, *ood = self.run(pixels, [self.output_name, CAM_OUTPUT, *self.outputs[1:]])
        return self.outcomes_of([logits, *ood]).rows(), cam

    def _feed(self, pixels: np.ndarray) -> np.ndarray:
        expected = (self.card.in_channels, self.card.height, self.card.width)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 input of shape [N, {', '.join(map(str, expected))}], got {pixels.dtype} {pixels.shape}"
            )
        return pixels.astype(np.float32) * self._scale + self._shift if self.normalize else pixels

    def warm_up(self, batch_sizes: list[int]) -> dict[int, float]:
        """Run each batch size once (kernel selection, memory arenas); returns seconds per size."""
        timings = {}
        for size in batch_sizes:
            zeros = np.zeros((size, self.card.in_channels, self.card.height, self.card.width), np.uint8)
            start = time.perf_counter()
            self.predict(zeros)
            timings[size] = time.perf_counter() - start
        return timings


def softmax(logits: np.ndarray) -> np.ndarray:
    """Uncalibrated probabilities: what the benchmarks' peer servers answer with."""
    return scores(logits)[0]


def unsure(row: Scored, calibration: Calibration | None) -> dict:
    """An answer's ``unsure`` and ``unsure_reason``. A model without calibration cannot tell, and
    says so: ``unsure`` is None (JSON null), never a guessed false."""
    if calibration is None:
        return {"unsure": None, "unsure_reason": None}
    reason = calibration.unsure_reason(float(row.probabilities.max()), row.energy, row.distance)
    return {"unsure": reason is not None, "unsure_reason": reason}


def unsure_reasons(outcomes: Outcomes, calibration: Calibration | None) -> np.ndarray | None:
    """:func:`unsure` for a whole batch, as the batch scorer writes it: each row's ``unsure_reason``
    (object [N], None where the model is sure), or None for a model without calibration, whose
    every ``unsure`` is null."""
    if calibration is None:
        return None
    return calibration.unsure_reasons(outcomes.probabilities.max(axis=1), outcomes.energies, outcomes.distances)


def answer(row: Scored, card: ModelCard, k: int) -> dict:
    """One image's answer, as /classify and /classify_batch give it: the label, its probability, the
    k best, and whether the model is unsure of it (the scorer writes the same columns for a whole
    batch at once, with :func:`rank` and :func:`unsure_reasons`)."""
    return {**top_k(row.probabilities, card.class_names, k), **unsure(row, card.calibration)}


def rank(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The k most likely classes of each row, most likely first, equal probabilities in class order:
    the one ranking of /classify, /classify_batch, the v2 protocol and the offline scorer.
    [classes] -> [k], or [N, classes] -> [N, k]."""
    return np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]


def top_k(probabilities: np.ndarray, class_names: tuple[str, ...], k: int) -> dict:
    """One image's answer: the best class, its probability, and the k best, most likely first."""
    order = rank(probabilities, k).tolist()  # Python ints and floats, converted in one call each
    ranked = [
        {"label": class_names[i], "index": i, "probability": p} for i, p in zip(order, probabilities[order].tolist())
    ]
    return {**ranked[0], "top_k": ranked}

"""The model card: the one contract between training, export, the model store and serving.

It says what the network is (architecture and its arguments), what its outputs mean (class names),
exactly how an image becomes its input (channels, size, resize policy, interpolation, mean, std)
and, once export has fitted it, how logits become calibrated probabilities and when an answer is
unsure (``calibration``).
Training writes it into the checkpoint, export into the ONNX file's ``metadata_props``, the store
into the model's metadata; serving only ever reads it back. This module must stay torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from model_store.calibration import Calibration
from model_store.errors import UsageError

CARD_VERSION = 1
RESIZE_MODES = ("stretch", "fit", "crop")  # see model_store.preprocess.resize_to_card
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
# How the image is decoded before that resize (model_store.preprocess): "full", every pixel, or
# "scaled", a JPEG at the smallest 1/2, 1/4 or 1/8 scale that keeps the detail the resize needs.
DECODES = ("full", "scaled")
ONNX_METADATA_KEY = "model_card"  # the metadata_props key that holds the card as JSON
# Architectures whose head is global average pooling -> linear (NiN: no linear), so whose export can
# add a class-activation map (python -m export --cam); export.cam splits each of them.
CAM_ARCHS = ("densenet", "googlenet", "nin", "resnet18", "resnet20", "resnet34")


@dataclass(frozen=True)
class ModelCard:
    arch: str  # model registry name, e.g. "lenet_bn"
    class_names: tuple[str, ...]  # logit i is class_names[i]
    in_channels: int  # 1: the image is converted to grayscale ("L"); 3: to RGB
    height: int  # model input height, pixels
    width: int  # model input width, pixels
    mean: tuple[float, ...]  # per channel, on the 0..1 pixel scale
    std: tuple[float, ...]  # per channel, on the 0..1 pixel scale
    resize: str = "fit"  # how an image of another size reaches height x width: one of RESIZE_MODES
    interpolation: str = "bilinear"  # resampling filter for that resize: one of INTERPOLATIONS
    decode: str = "full"  # one of DECODES; "full" for every card written before the field existed
    # resize "crop" keeps this share of the scaled image's shorter side: torchvision's and timm's
    # evaluation recipes scale to 256 and crop 224 (0.875); 1.0, the whole side, for every card before it.
    crop_fraction: float = 1.0
    arch_args: dict[str, Any] = field(default_factory=dict)  # builder kwargs besides in_channels, num_classes
    dataset: str = ""  # what the model was trained on, for people
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. {"epoch": 12, "test_acc": 0.91}
    export: dict[str, Any] = field(default_factory=dict)  # filled by export: opset, checkpoint hash, parity
    calibration: Calibration | None = None  # fitted by export on held-out images; None: unsure is null
    # A fine-tune's provenance (training.field): its parent's tag, the reviewed set's digest and
    # counts per class and source, the recipe, and the parent's figures on the same images.
    lineage: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Cards come back from files people can edit, so check everything a consumer relies on.
        for name in ("class_names", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.arch:
            raise UsageError("model card: arch is empty")
        if not self.class_names or not all(isinstance(c, str) and c for c in self.class_names):
            raise UsageError(f"model card: class_names must be non-empty strings, got {self.class_names!r}")
        if len(set(self.class_names)) != len(self.class_names):
            raise UsageError(f"model card: class_names has duplicates: {self.class_names!r}")
        if self.in_channels not in (1, 3):
            raise UsageError(f"model card: in_channels must be 1 or 3, got {self.in_channels!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"model card: {name} must be a positive integer, got {value!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_channels:
                raise UsageError(f"model card: {name} has {len(values)} values for {self.in_channels} channel(s)")
            # NaN fails no comparison (NaN <= 0 is False): the std test below would let it through.
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise UsageError(f"model card: {name} must be finite numbers, got {values!r}")
        if any(s <= 0 for s in self.std):
            raise UsageError(f"model card: std must be positive, got {self.std!r}")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"model card: resize {self.resize!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"model card: interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.decode not in DECODES:
            raise UsageError(f"model card: decode {self.decode!r} is not one of {DECODES}")
        fraction = self.crop_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.25 <= fraction <= 1:
            raise UsageError(f"model card: crop_fraction must be a number from 0.25 to 1, got {fraction!r}")
        if fraction != 1 and self.resize != "crop":
            raise UsageError(f"model card: crop_fraction {fraction} needs resize 'crop', not {self.resize!r}")
        if isinstance(self.calibration, dict):  # as it comes back from JSON
            try:
                object.__setattr__(self, "calibration", Calibration.from_dict(self.calibration))
            except (TypeError, ValueError) as err:
                raise UsageError(f"model card: {err}") from None
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise UsageError(f"model card: calibration must be an object or null, got {self.calibration!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists, not tuples), tagged with the card format version."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if self.calibration is None:  # left out, so an uncalibrated card reads as it did before the field
            del fields["calibration"]
        else:
            fields["calibration"] = self.calibration.to_dict()
        if self.decode == "full":  # likewise; a "scaled" card is refused by code that cannot honour it
            del fields["decode"]
        if self.crop_fraction == 1:  # likewise
            del fields["crop_fraction"]
        if not self.lineage:  # likewise: a model trained from scratch has none
            del fields["lineage"]
        return json.dumps({"card_version": CARD_VERSION, **fields}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        data = dict(data)
        version = data.pop("card_version", None)
        if version != CARD_VERSION:
            raise UsageError(f"model card: card_version {version!r} is not supported (this code reads {CARD_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"model card: unknown field(s) {unknown}; known: {sorted(known)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise UsageError(f"model card: missing field(s) {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json_object(text, "model card"))


def json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; a UsageError naming ``what`` when it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{what}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data

"""What the OpenAPI document says of the classify routes: the multipart forms they read and the
answers they give (pydantic models).

The handlers read the body themselves (``serving.requests``) and return plain dicts (built by
``model_store.engine.top_k``); these classes only describe them, so documenting a field costs nothing
per request.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from bentoml import IODescriptor
from bentoml._internal.service.openapi.specification import MediaType, Response, Schema
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.requests import DEFAULT_TOP_K, IMAGE_FIELD, IMAGES_FIELD


class Ranked(BaseModel):
    label: str
    index: int = Field(description="the class's position in the model's class list")
    probability: float = Field(description="calibrated with the card's temperature when the model has calibration")


Reason = Literal["out_of_distribution", "low_confidence"]  # model_store.calibration.UNSURE_REASONS
# BentoML's OpenAPI document (3.0) keeps only the first branch of pydantic's anyOf [type, null]: say
# "nullable" beside it, or a null answer breaks the document's own schema.
NULLABLE = {"nullable": True}
UNSURE = (
    "true when the answer should not be trusted, false when it may be; null when the model has no "
    "calibration to tell by (exported from a run that held no validation images out). "
    "The label and top_k are there either way"
)
UNSURE_REASON = (
    "why it is unsure: the image is unlike the training images (out_of_distribution, checked first), "
    "or the model's calibrated confidence is below the card's threshold (low_confidence); null when not unsure"
)


class Prediction(Ranked):
    top_k: list[Ranked] = Field(description="the k most likely classes, most likely first")
    unsure: bool | None = Field(description=UNSURE, json_schema_extra=NULLABLE)
    unsure_reason: Reason | None = Field(description=UNSURE_REASON, json_schema_extra=NULLABLE)


class ClassifyAnswer(Prediction):
    model: str = Field(description="name of the model that answered")
    version: str = Field(description="its version in the model store (a hash of the ONNX file)")


class ExplainAnswer(ClassifyAnswer):
    cam_png: str = Field(
        description="base64 PNG: the class-activation map of the top class, coloured (blue low, red high) over the "
        "model's input; send `Accept: image/png` to get the PNG alone"
    )


class BatchItem(BaseModel):
    filename: str
    label: str | None = None
    index: int | None = None
    probability: float | None = None
    top_k: list[Ranked] | None = None
    unsure: bool | None = Field(None, description=UNSURE, json_schema_extra=NULLABLE)
    unsure_reason: Reason | None = Field(None, description=UNSURE_REASON, json_schema_extra=NULLABLE)
    error: str | None = Field(None, description="why this image could not be classified; the others still are")


class ClassifyBatchAnswer(BaseModel):
    model: str
    version: str
    results: list[BatchItem] = Field(description="one per image, in the order they were sent")


class ErrorAnswer(BaseModel):
    error: str = Field(description="what was wrong with the request, and how to fix it")


class ModelInfo(BaseModel):
    name: str
    version: str
    tag: str
    default: bool
    provider: str = Field(description="the ONNX Runtime execution provider running it")
    provider_error: str | None = Field(None, description="set when a GPU was asked for and not used")
    precision: str = Field(
        description="what the graph computes in: float32, float16 or int8 (python -m export --fp16 / --int8)"
    )
    card: dict = Field(description="the model card: classes, input size, preprocessing, metrics, export settings")


class FailedModelInfo(BaseModel):
    name: str
    version: str
    tag: str
    error: str = Field(description="why it is not served: the check against its card, or the warm-up, that failed")


class ModelsAnswer(BaseModel):
    default: str = Field(description="tag of the model a request without `model` gets; it may be in `failed`")
    models: list[ModelInfo]
    failed: list[FailedModelInfo] = Field(
        default_factory=list,
        description="configured models that are not served, with the reason; requests naming one get 503",
    )
    review: bool = Field(
        False, description="whether /review answers: the service captures (SERVING_CAPTURE) and a token is set"
    )


class ModelDrift(BaseModel):
    model: str = Field(description="the model's tag")
    monitored: bool = Field(description="false for a graph exported without a drift reference; `reason` says so")
    reason: str | None = None
    window: int | None = Field(None, description="answers per window: the figures compare up to this many recent ones")
    minimum_answers: int | None = Field(None, description="the fewest answers the figures are computed over")
    images_seen: int | None = Field(None, description="answers this worker has given with this model")
    answers: int | None = Field(None, description="the answers the figures are over: the last ones, up to `window`")
    figures: dict[str, float] | None = Field(
        None,
        description="per statistic, the window's figure (null under `minimum_answers`): out_of_distribution_share, "
        "low_confidence_share, class_psi, feature_frechet, mean_ood_distance",
    )
    levels: dict[str, float] | None = Field(
        None, description="per statistic, what in-distribution windows of `level_answers` answers stay under"
    )
    level_answers: int | None = Field(
        None, description="the window size the levels were fitted for: `answers`, or the largest count under it"
    )
    level_images: int | None = Field(None, description="the held-out images the levels were fitted on")
    alerts: list[str] = Field(default_factory=list, description="the statistics above their level now")
    history: list[dict[str, int | float]] = Field(
        default_factory=list,
        description="recent figures, oldest first, each with its unix `time`, the `images` seen and the `answers` "
        "they are over",
    )
    candidate_of: str | None = Field(
        None, description="for a rollout's candidate (serving.rollout): the name of the model it may replace"
    )
    rollout: dict[str, Any] | None = Field(
        None,
        description="on the live model and its candidate during a rollout: agreement on sure answers, each "
        "version's unsure, out-of-distribution and error shares, accuracy on labelled captures, the gates",
    )


class MonitorAnswer(BaseModel):
    models: list[ModelDrift]


class _JsonAnswer(IODescriptor):
    """A BentoML output spec: the handler's dict as JSON (status set through ``ctx.response``),
    documented in the OpenAPI document by ``answer``."""

    media_type: ClassVar[str] = "application/json"
    answer: ClassVar[type[BaseModel]] = ErrorAnswer

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        return cls.answer.model_json_schema(*args, **kwargs)

    @classmethod
    async def to_http_response(cls, obj, serde) -> JSONResponse:
        return JSONResponse(obj)


class ClassifyOutput(_JsonAnswer):
    answer: ClassVar[type[BaseModel]] = ClassifyAnswer


class ExplainOutput(_JsonAnswer):
    answer: ClassVar[type[BaseModel]] = ExplainAnswer


class ClassifyBatchOutput(_JsonAnswer):
    answer: ClassVar[type[BaseModel]] = ClassifyBatchAnswer


class _UnreadBody(IODescriptor):
    """A BentoML input spec that leaves the body unread for :func:`read_classify_request` and
    :func:`read_batch_request`; its schema documents the multipart form.

    BentoML reads the schema in two modes, and a file field differs between them, as it does for
    BentoML's own ``File`` and ``Image`` types (``_bentoml_sdk/validators.py``): the OpenAPI
    document asks for ``mode="serialization"`` and gets the standard ``type: string, format:
    binary``; ``/schema.json`` asks for the default ``mode="validation"`` and gets BentoML's
    ``type: file``, by which BentoML's HTTP clients know to upload that argument as a multipart
    file rather than put it in a JSON body."""

    media_type: ClassVar[str] = "multipart/form-data"
    required: ClassVar[list[str]] = []

    @classmethod
    def properties(cls, file: dict) -> dict[str, dict]:
        """The form's fields, given the schema of one image file."""
        raise NotImplementedError

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> _UnreadBody:
        return cls()

    @classmethod
    def model_json_schema(cls, *args, mode: str = "validation", **kwargs) -> dict:
        file = {**(_BENTOML_FILE if mode == "validation" else _OPENAPI_FILE), "description": _IMAGE_FORMATS}
        return {
            "title": cls.__name__,
            "type": "object",
            "required": [*cls.required],
            "properties": cls.properties(file),
        }

    @classmethod
    def openapi_components(cls, name: str) -> dict[str, Schema]:
        # BentoML builds the components in validation mode; the OpenAPI document keeps standard types.
        return {cls.__name__: Schema(**cls.model_json_schema(mode="serialization"))}


_BENTOML_FILE = {"type": "file", "format": "image"}
_OPENAPI_FILE = {"type": "string", "format": "binary"}
_IMAGE_FORMATS = "an image: PNG, JPEG, BMP, GIF, TIFF or WEBP"
_OPTIONS = {
    "top_k": {
        "type": "integer",
        "minimum": 1,
        "default": DEFAULT_TOP_K,
        "description": "how many classes to list (1 to the number of classes)",
    },
    "model": {
        "type": "string",
        "description": "a model name or name:version from GET /models (default: the service's default model)",
    },
}


class ClassifyForm(_UnreadBody):
    required: ClassVar[list[str]] = [IMAGE_FIELD]

    @classmethod
    def properties(cls, file: dict) -> dict[str, dict]:
        return {IMAGE_FIELD: file, **_OPTIONS}


class ClassifyBatchForm(_UnreadBody):
    required: ClassVar[list[str]] = [IMAGES_FIELD]

    @classmethod
    def properties(cls, file: dict) -> dict[str, dict]:
        images = {"type": "array", "items": file, "description": "the images, answered in this order"}
        return {IMAGES_FIELD: images, **_OPTIONS}


def explain_refusals() -> dict[int, Response]:
    """The answers of /explain that BentoML's document does not list (it lists 200, 400, 404 and
    500 for every route): 422 for a model without a class-activation map."""
    error = {"application/json": MediaType(schema=Schema(**ErrorAnswer.model_json_schema()))}
    why = "the model has no class-activation map (not a global-average-pool model, or exported without --cam)"
    return {422: Response(description=why, content=error)}

"""What the OpenAPI document says of the classify routes: the multipart forms they read and the
answers they give (pydantic models).

The handlers read the body themselves (``serving.requests``) and return plain dicts (built by
``serving.engine.top_k``); these classes only describe them, so documenting a field costs nothing
per request.
"""

from __future__ import annotations

from typing import ClassVar

from bentoml import IODescriptor
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.requests import DEFAULT_TOP_K, IMAGE_FIELD, IMAGES_FIELD


class Ranked(BaseModel):
    label: str
    index: int = Field(description="the class's position in the model's class list")
    probability: float


class Prediction(Ranked):
    top_k: list[Ranked] = Field(description="the k most likely classes, most likely first")


class ClassifyAnswer(Prediction):
    model: str = Field(description="name of the model that answered")
    version: str = Field(description="its version in the model store (a hash of the ONNX file)")


class BatchItem(BaseModel):
    filename: str
    label: str | None = None
    index: int | None = None
    probability: float | None = None
    top_k: list[Ranked] | None = None
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


class ClassifyBatchOutput(_JsonAnswer):
    answer: ClassVar[type[BaseModel]] = ClassifyBatchAnswer


class _UnreadBody(IODescriptor):
    """A BentoML input spec that leaves the body unread for :func:`read_classify_request` and
    :func:`read_batch_request`; its schema documents the multipart form in the OpenAPI document."""

    media_type: ClassVar[str] = "multipart/form-data"
    form_schema: ClassVar[dict] = {}

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> _UnreadBody:
        return cls()

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        return cls.form_schema


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
_FILE = {"type": "string", "format": "binary", "description": "an image: PNG, JPEG, BMP, GIF, TIFF or WEBP"}


class ClassifyForm(_UnreadBody):
    form_schema: ClassVar[dict] = {
        "title": "ClassifyForm",
        "type": "object",
        "required": [IMAGE_FIELD],
        "properties": {IMAGE_FIELD: _FILE, **_OPTIONS},
    }


class ClassifyBatchForm(_UnreadBody):
    form_schema: ClassVar[dict] = {
        "title": "ClassifyBatchForm",
        "type": "object",
        "required": [IMAGES_FIELD],
        "properties": {
            IMAGES_FIELD: {"type": "array", "items": _FILE, "description": "the images, answered in this order"},
            **_OPTIONS,
        },
    }

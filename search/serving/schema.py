"""The JSON the API answers with, as pydantic models (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ClassScore", "ErrorBody", "Health", "ImageInfo", "ModelAnswer", "ModelInfo", "Prediction"]


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong with the request, and how to fix it")


class ClassScore(BaseModel):
    label: str = Field(description="the class name, as the card names it")
    index: int = Field(description="the class's position in the model's output")
    probability: float = Field(ge=0, le=1, description="softmax of the logits")


class ModelAnswer(BaseModel):
    name: str
    role: str = Field(
        description="pruned or unpruned (an export, as its card's policy says) or baseline (the study's model)"
    )
    precision: str
    top: list[ClassScore] = Field(description="the k most probable classes, most probable first")
    inference_ms: float = Field(description="ONNX Runtime's run of this model for this request, in milliseconds")
    agrees_with_baseline: bool | None = Field(
        description="whether this model's top-1 is the baseline's (null: no baseline served, or this is it)"
    )


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    mode: str = Field(description="the stored pixel mode (L, RGBA, P, I;16, ...) before conversion to RGB")
    exif_rotated: bool = Field(description="whether an EXIF orientation was applied")


class Prediction(BaseModel):
    image: ImageInfo
    k: int
    models: list[ModelAnswer]
    baseline: str | None = Field(description="the name of the baseline model, when one is served")
    total_ms: float = Field(description="decode, preprocess and every model's run, in milliseconds")


class ModelInfo(BaseModel):
    name: str
    role: str
    precision: str
    file: str
    classes: list[str]
    input_size: int
    summary: dict[str, Any] = Field(description="latency at search, top-1, MACs, params and file size")
    card: dict[str, Any] = Field(description="the model card (card.json)")


class Health(BaseModel):
    status: str
    models: list[str]
    uptime_s: float
    workers: int = 1
    slots: int = 1
    threads_per_session: int = 1

"""What a request to the latency target may say, checked before anything is done with it."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

__all__ = ["MAX_INPUT_ELEMENTS", "SHA256", "Refused", "check_shape", "timing_request"]

MAX_INPUT_ELEMENTS = 1 << 26
SHA256 = re.compile(r"^[0-9a-f]{64}$")
"""How models are named: the SHA-256 of their bytes, lower-case hex."""


class Refused(Exception):
    """A request the service answers with ``status`` and a JSON ``error`` (plus ``extra`` fields)."""

    def __init__(self, status: HTTPStatus, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def timing_request(request: dict[str, Any]) -> tuple[str, str | None, list[int]]:
    """The model's hash, the reference's (or None) and the input shape of a ``POST /v1/time`` body."""
    unknown = set(request) - {"model", "reference", "input_shape"}
    if unknown:
        raise Refused(HTTPStatus.BAD_REQUEST, f"unknown fields {sorted(unknown)}; send model, reference, input_shape")
    model, reference, shape = request.get("model"), request.get("reference"), request.get("input_shape")
    if not isinstance(model, str) or not SHA256.match(model):
        raise Refused(HTTPStatus.BAD_REQUEST, "model must be the SHA-256 (hex) of an uploaded model")
    if reference is not None and (not isinstance(reference, str) or not SHA256.match(reference)):
        raise Refused(HTTPStatus.BAD_REQUEST, "reference must be null or the SHA-256 (hex) of an uploaded model")
    ok = isinstance(shape, list) and 1 <= len(shape) <= 8
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536 for d in shape)
    if not ok:
        raise Refused(HTTPStatus.BAD_REQUEST, "input_shape must be a list of 1 to 8 positive whole numbers")
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise Refused(HTTPStatus.BAD_REQUEST, f"input_shape has {elements} elements; at most {MAX_INPUT_ELEMENTS}")
    return model, reference, shape


def check_shape(shape: list[int], declared: list[int | str], what: str) -> None:
    """Refuse ``shape`` unless it fits the model's declared input (symbolic dimensions fit anything)."""
    fits = len(shape) == len(declared) and all(
        not isinstance(d, int) or d == s for s, d in zip(shape, declared, strict=True)
    )
    if not fits:
        raise Refused(HTTPStatus.BAD_REQUEST, f"{what} takes input {declared}, not {shape}")

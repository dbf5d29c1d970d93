"""The web app: the page at ``/`` and the JSON API (``POST /predict``, ``GET /models``, ``GET /health``).

FastAPI, so the OpenAPI schema is at ``/openapi.json``. Every request-shaped mistake is a JSON
``{"error": ...}`` with a 4xx status, and the server goes on serving. Inference runs in worker
threads, at most ``slots`` requests at once (the cores divided by each session's threads), so
concurrent requests queue instead of oversubscribing the CPU, and what their images take decoded
is reserved from a memory budget, as are their bodies while they arrive and wait
(:mod:`search.serving.budget`). The connection itself (deadlines,
header cap, overload) is guarded below the app, in :mod:`search.serving.guard`. The page's files
are read into memory when the app is made: no request path reaches the file system.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from search.serving.budget import BodyBudget, MemoryBudget, NoRoom, Reservation
from search.serving.images import BadImage, Decoded, decode_image
from search.serving.models import ServedModel
from search.serving.schema import ErrorBody, Health, ModelInfo, Prediction
from search.serving.upload import FIELD, image_bytes, read_capped

__all__ = ["Limits", "create_app"]

log = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorBody} for status in (400, 408, 413, 415, 422, 431, 503)}
_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {FIELD: {"type": "string", "format": "binary", "description": "the image file"}},
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
    "description": f"the image: a multipart form with one file (in field `{FIELD}`, `file` or any other name), "
    "or the raw bytes as the body "
    "(any Content-Type but multipart, e.g. image/jpeg)",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = 20_000_000
    max_upload_total: int = 400_000_000
    """Memory the bodies of all requests in flight may take together (each twice its size); more are 503."""
    max_pixels: int = 40_000_000
    slots: int = 1
    """Requests whose images are decoded and run at the same time; the rest wait their turn."""
    max_k: int = 100
    max_decode_bytes: int = 400_000_000
    """Memory one request's images may take decoded and converted to RGB (checked from the header)."""
    max_decode_total: int = 800_000_000
    """Memory the images of all requests in flight may take together; a request waits for room."""


def create_app(models: list[ServedModel], limits: Limits, *, about: dict[str, Any] | None = None) -> FastAPI:
    """The app serving ``models`` (one of them may have the ``baseline`` role)."""
    app = FastAPI(
        title="prune-search serve",
        summary="Top-k predictions of shipped models, beside the unpruned model they replace",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: blank offline; /openapi.json stays
        redoc_url=None,
    )
    slots = asyncio.Semaphore(limits.slots)
    budget = MemoryBudget(limits.max_decode_total, limits.max_decode_bytes)
    bodies = BodyBudget(limits.max_upload_total)
    baseline = next((m for m in models if m.role == "baseline"), None)
    started = time.time()
    page = {name: _asset(name) for name in ("page.html", "page.js", "page.css", "favicon.svg")}
    _errors(app)

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page["page.html"])

    @app.get("/page.js", include_in_schema=False)
    def script() -> Response:
        return Response(page["page.js"], media_type="text/javascript")

    @app.get("/page.css", include_in_schema=False)
    def style() -> Response:
        return Response(page["page.css"], media_type="text/css")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(page["favicon.svg"], media_type="image/svg+xml")

    @app.get("/health", response_model=Health, summary="Whether the server is up, and what it serves")
    def health() -> Health:
        return Health(
            status="ok", models=[m.name for m in models], uptime_s=round(time.time() - started, 1), **(about or {})
        )

    @app.get("/models", response_model=list[ModelInfo], summary="Each served model's card and summary")
    def list_models() -> list[ModelInfo]:
        return [_info(m) for m in models]

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=_ERRORS,  # type: ignore[arg-type]
        summary="Top-k classes of one image, from every served model",
        openapi_extra={"requestBody": _BODY},
    )
    async def predict(
        request: Request, k: int = Query(3, ge=1, le=limits.max_k, description="how many classes per model")
    ) -> Prediction:
        with bodies.hold() as hold:  # held until answered: a request queued for a slot keeps its image in memory
            try:
                body = await read_capped(
                    request.headers.get("content-length"), request.stream(), limits.max_upload_bytes, hold
                )
            except ClientDisconnect:  # gone, or refused by the connection's guard (its JSON 408 already written)
                return Response(status_code=400)  # type: ignore[return-value]  # never sent: nobody reads it
            except NoRoom:
                log.warning("uploads in flight hold %d of %d bytes: 503", bodies.used, bodies.total)
                return JSONResponse(  # type: ignore[return-value]
                    {"error": "the server holds as many uploads as it may at once; retry after a second"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            data = image_bytes(request.headers.get("content-type", ""), body)
            del body  # a form's image was copied out of it
            hold.shrink_to(len(data))
            async with slots:
                return await run_in_threadpool(_answer, data, k, models, baseline, limits.max_pixels, budget)

    return app


def _answer(
    data: bytes, k: int, models: list[ServedModel], baseline: ServedModel | None, max_pixels: int, budget: MemoryBudget
) -> Prediction:
    with budget.request() as reservation:
        return _predict(data, k, models, baseline, max_pixels, reservation)


def _predict(
    data: bytes,
    k: int,
    models: list[ServedModel],
    baseline: ServedModel | None,
    max_pixels: int,
    reservation: Reservation,
) -> Prediction:
    """Decode (once per native size), preprocess (once per distinct record) and run every model; the
    answers with top-k each.

    A JPEG decodes at a reduced scale no smaller than the model's native size, as training read
    image folders, so each model sees the pixels it was trained on; models of one native size share a decode.
    """
    started = time.perf_counter()
    decodes: dict[int, Decoded] = {}
    inputs: dict[Any, np.ndarray] = {}
    answers: list[dict[str, Any]] = []
    for model in models:
        pre = model.preprocessing
        if pre.native_size not in decodes:
            decodes[pre.native_size] = decode_image(
                data, max_pixels=max_pixels, draft_size=pre.native_size, reservation=reservation
            )
        if pre not in inputs:
            inputs[pre] = pre(decodes[pre.native_size].image)
        logits, ms = model.logits(inputs[pre])
        answers.append({"model": model, "probabilities": _softmax(logits[0]), "inference_ms": ms})
    top1 = {a["model"].name: int(np.argmax(a["probabilities"])) for a in answers}
    results = []
    for a in answers:
        model, p = a["model"], a["probabilities"]
        order = np.argsort(-p, kind="stable")[: min(k, len(p))]
        agrees = None
        if baseline is not None and model is not baseline and model.study == baseline.study:
            agrees = top1[model.name] == top1[baseline.name]
        results.append(
            {
                "name": model.name,
                "role": model.role,
                "precision": model.precision,
                "top": [
                    {"label": model.preprocessing.classes[i], "index": int(i), "probability": float(p[i])}
                    for i in order
                ],
                "inference_ms": round(a["inference_ms"], 3),
                "agrees_with_baseline": agrees,
            }
        )
    decoded = next(iter(decodes.values()))
    image = {
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "mode": decoded.mode,
        "exif_rotated": decoded.exif_rotated,
    }
    return Prediction(
        image=image,
        k=k,
        models=results,
        baseline=baseline.name if baseline else None,
        total_ms=round((time.perf_counter() - started) * 1000.0, 3),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _info(model: ServedModel) -> ModelInfo:
    pre = model.preprocessing
    return ModelInfo(
        name=model.name,
        role=model.role,
        precision=model.precision,
        file=model.file,
        classes=list(pre.classes),
        input_size=pre.input_size,
        summary=model.summary,
        card=model.card,
    )


def _asset(name: str) -> bytes:
    return (resources.files("search.serving") / "static" / name).read_bytes()


def _errors(app: FastAPI) -> None:
    """Every error as ``{"error": message}``."""

    @app.exception_handler(BadImage)
    async def bad_image(_: Request, exc: BadImage) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such path {request.url.path[:100]!r}; the API is POST /predict, GET /models, GET /health"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:100]}; see /openapi.json"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": f"bad request parameters: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": "internal error while answering; the server goes on serving"}, status_code=500)

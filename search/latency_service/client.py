"""Timing on a latency target: :class:`RemoteTimer`, the second implementation of the Timer protocol.

The search machine prunes, quantizes, trains and evaluates; the target (``cli.py target`` on the
device) only times. Models go up once, by SHA-256 (the baseline is uploaded once per study, not
with every candidate), and every timing names them by hash. A target that stops answering
mid-study is retried with backoff, each wait shown in the progress line; after ``patience``
seconds :class:`TargetLost` stops the search cleanly. A latency that was not measured is never
recorded.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from search.errors import UsageError
from search.measuring.timing import Latency
from search.progress import NullReporter, Reporter

__all__ = ["RemoteTimer", "TargetLost", "check_target_url"]

REQUEST_TIMEOUT_S = 900.0
"""How long one request may take: waiting behind other workers' timings, then the timing itself."""


class TargetLost(Exception):
    """The latency target did not answer for longer than the client's patience."""


class _Unreachable(Exception):
    """One failed attempt to reach the target (retried)."""


def check_target_url(url: str) -> str:
    """``url`` without a trailing slash, or a :class:`UsageError` saying what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--target must be an http:// or https:// URL such as http://HOST:8765, got {url!r}")
    if parts.username or parts.password:
        raise UsageError("--target must not carry credentials; pass the token with --target-token-file")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise UsageError(f"--target is the service's address only (http://HOST:PORT), got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


class RemoteTimer:
    """Times ONNX models on a latency target over HTTP (see :mod:`search.latency_service.service`)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        patience_s: float = 300.0,
        reporter: Reporter | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = check_target_url(url)
        self._token = token.strip()
        self.patience_s = patience_s
        self.reporter = reporter or NullReporter()
        self._context = context
        self._uploaded: set[str] = set()
        self._hashes: dict[bytes, str] = {}
        self._info: dict[str, Any] | None = None

    # -- the Timer protocol ----------------------------------------------------------------

    @property
    def where(self) -> str:
        return self.url

    @property
    def threads(self) -> int:
        return int(self.info()["threads"])

    @property
    def runtime(self) -> str:
        """The runtime the target times in (a target from before ``--runtime`` times in ONNX Runtime)."""
        return str(self.info().get("runtime") or "onnxruntime")

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.info()["fingerprint"])

    def time(
        self, onnx_model: bytes | str, input_shape: tuple[int, ...], *, reference: bytes | str | None = None
    ) -> Latency:
        model = _bytes(onnx_model)
        ref = _bytes(reference) if reference is not None else None
        model_sha = self._sha256(model)
        ref_sha = self._sha256(ref) if ref is not None else None
        shas = {model_sha: model}
        if ref is not None and ref_sha is not None:
            shas[ref_sha] = ref
        for sha, data in shas.items():
            if sha not in self._uploaded:
                self._upload(sha, data)
        body = {"model": model_sha, "reference": ref_sha, "input_shape": list(input_shape)}
        waiting = self.info(refresh=True).get("waiting", 0)
        if waiting:
            self.reporter.phase(f"latency: waiting for the target ({waiting} timing(s) ahead)")
        for _ in range(3):  # a restarted target has forgotten its models: upload them again
            status, answer = self._request("POST", "/v1/time", json.dumps(body).encode(), "application/json")
            if status == 404 and answer.get("missing"):
                for sha in answer["missing"]:
                    if sha in shas:
                        self._upload(sha, shas[sha])
                continue
            self._check(status, answer, "timing the model")
            return Latency(
                median_ms=float(answer["median_ms"]),
                p90_ms=float(answer["p90_ms"]),
                runs=int(answer["runs"]),
                stable=bool(answer["stable"]),
                reference_median_ms=answer.get("reference_median_ms"),
                reference_p90_ms=answer.get("reference_p90_ms"),
            )
        raise TargetLost(f"latency target {self.url} keeps forgetting uploaded models; is it short of memory?")

    def _sha256(self, data: bytes) -> str:
        """The hash models are named by; the reference (the same bytes for every candidate) is hashed once."""
        sha = self._hashes.get(data)  # a bytes key hashes itself once and is then found by identity
        if sha is None:
            sha = hashlib.sha256(data).hexdigest()
            if len(self._hashes) >= 4:
                self._hashes.pop(next(iter(self._hashes)))
            self._hashes[data] = sha
        return sha

    # -- requests ----------------------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> dict[str, Any]:
        """The target's ``/v1/info`` (fingerprint, threads, timings waiting); fetched once unless ``refresh``."""
        if self._info is None or refresh:
            status, answer = self._request("GET", "/v1/info")
            self._check(status, answer, "asking for its fingerprint")
            self._info = answer
        return self._info

    def connect(self) -> dict[str, Any]:
        """The target's info, or a one-line :class:`UsageError` naming the URL when it cannot be used."""
        try:
            status, answer = self._attempt("GET", "/v1/info", None, None)
        except _Unreachable as exc:
            raise UsageError(
                f"latency target {self.url} is unreachable ({exc}); start `cli.py target` on the device "
                "or check --target"
            ) from None
        self._check(status, answer, "connecting")
        self._info = answer
        return answer

    def _upload(self, sha: str, data: bytes) -> None:
        limit = int(self.info().get("max_upload_bytes") or 0)
        if limit and len(data) > limit:
            raise UsageError(
                f"the model has {len(data) / 1e6:.1f} MB; latency target {self.url} accepts at most "
                f"{limit / 1e6:.1f} MB (start it with a larger --max-upload-mb)"
            )
        status, answer = self._request("PUT", f"/v1/models/{sha}", data, "application/octet-stream")
        self._check(status, answer, f"uploading a model of {len(data) / 1e6:.1f} MB")
        self._uploaded.add(sha)

    def _check(self, status: int, answer: dict[str, Any], doing: str) -> None:
        if status < 400:
            return
        error = answer.get("error", "no reason given")
        if status == 401:
            raise UsageError(
                f"latency target {self.url} refused the token (401); pass the token file `cli.py target` printed "
                "at start as --target-token-file (or set PRUNE_SEARCH_TARGET_TOKEN)"
            )
        raise UsageError(f"latency target {self.url} refused {doing} ({status}: {error})")

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One request, retried with backoff while the target is unreachable or busy, up to ``patience_s``."""
        started = time.monotonic()
        wait, attempt = 1.0, 0
        while True:
            attempt += 1
            try:
                status, answer = self._attempt(method, path, body, content_type)
                if status != 503:
                    if attempt > 1:
                        self.reporter.info(
                            f"Latency target {self.url} answered again after {time.monotonic() - started:.0f} s"
                        )
                    return status, answer
                reason, state = answer.get("error", "busy"), "busy"
            except _Unreachable as exc:
                reason, state = str(exc), "unreachable"
            if attempt == 1:
                self.reporter.warn(
                    f"latency target {self.url} {state} ({reason}); retrying for up to {self.patience_s:.0f} s"
                )
            waited = time.monotonic() - started
            if waited + wait > self.patience_s:
                raise TargetLost(
                    f"latency target {self.url} did not answer for {waited:.0f} s ({reason}); the trial is put back "
                    "and the study resumes when the target is back (rerun the same command)"
                )
            self.reporter.phase(f"latency target {state} ({reason}); retry {attempt} in {wait:.0f} s")
            time.sleep(wait)
            wait = min(wait * 2, 30.0)

    def _attempt(
        self, method: str, path: str, body: bytes | None, content_type: str | None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=self._context) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out, no route
            reason = getattr(exc, "reason", exc)
            raise _Unreachable(str(reason).splitlines()[0] if str(reason) else type(exc).__name__) from None


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"error": "the answer is not JSON (is this a prune-search latency target?)"}
    return value if isinstance(value, dict) else {"error": "unexpected answer"}


def _bytes(model: bytes | str) -> bytes:
    return model if isinstance(model, bytes) else Path(model).read_bytes()

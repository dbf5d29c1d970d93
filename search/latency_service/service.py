"""``cli.py target``: a small HTTP service that times models on the device that will run them.

It times exactly as the search does locally (:func:`search.measuring.timing.measure`: its
``--runtime`` on the CPU, ONNX Runtime by default, batch 1, the service's threads, warm-up,
rounds until the median is stable, interleaved with a reference model) and answers with median,
p90, runs, stability, the ratio to the reference and the device's hardware fingerprint. One model
is timed at a time (a lock is the queue), so workers that share a target never overlap on it.

It needs only numpy and its runtime (onnxruntime, or openvino; executorch brings torch): with
ONNX Runtime or OpenVINO it imports no torch, so it runs on a board where PyTorch is not
installed (``python -m search.latency_service``).

The protocol (every request carries ``Authorization: Bearer TOKEN``; errors are JSON
``{"error": ...}`` with a 4xx status, and the service keeps serving):

* ``GET /v1/info``: fingerprint, threads, timings waiting, upload limit.
* ``PUT /v1/models/SHA256``: the model's bytes (at most ``--max-upload-mb``, refused with 413
  before they are read). Checked: the hash, a self-contained ONNX model (no external data), one
  input, loadable by ONNX Runtime. Kept in memory by hash (least recently used dropped first).
* ``POST /v1/time``: ``{"model": SHA256, "reference": SHA256 or null, "input_shape": [1, 3, H, W]}``;
  404 with ``"missing"`` names models to upload first.

Bounds (README, "Time on the target device"): the token is checked on the headers, before a
body is read or ``100 Continue`` sent; headers must arrive within ``--request-timeout-s`` and a
body within that plus 1 s per MiB; at most :data:`~search.latency_service.connections.MAX_CONNECTIONS`
connections at once, more queued; models are loaded and timed in a child process
(:mod:`search.measuring.timing_process`) limited to ``--max-memory-mb`` and killed past
``--max-timing-s`` for a whole timing, warm-up included.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from search.latency_service.connections import (
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    QUEUE_WAIT_S,
    BoundedServer,
    DeadlineReader,
    linger,
)
from search.latency_service.model_store import ModelStore
from search.latency_service.onnx_check import ModelRejected, check_upload
from search.latency_service.options import (
    BODY_BYTES_PER_S,
    DEFAULT_PORT,
    DEFAULT_TOKEN_FILE,
    add_arguments,
    argument_problem,
    load_or_create_token,
)
from search.latency_service.protocol import SHA256, Refused, check_shape, timing_request
from search.measuring.hardware import fingerprint, fingerprint_id
from search.measuring.timing import LatencySettings
from search.measuring.timing_process import TimingFailed, TimingProcess

__all__ = ["DEFAULT_PORT", "DEFAULT_TOKEN_FILE", "Target", "add_arguments", "load_or_create_token", "serve"]

API = "/v1"
MAX_JSON_BYTES = 64 * 1024
"""A timing request is a few numbers and two hashes."""
MAX_WAITING = 32
"""Timing requests allowed to wait for the device at once; more get 503."""
MAX_UPLOADS = 2
"""Uploads read at once (each up to the upload limit in memory); more get 503."""


class Target:
    """What the handlers share: the token, the models, the one lock the device is timed under."""

    def __init__(self, token: str, args: argparse.Namespace) -> None:
        threads, max_upload_bytes = args.threads, int(args.max_upload_mb * 1024**2)
        self.token = token.encode()
        self.settings = LatencySettings(threads=threads, runtime=args.runtime)
        self.max_upload_bytes = max_upload_bytes
        self.request_timeout_s = float(args.request_timeout_s)
        self.timing = TimingProcess(threads, args.max_memory_mb, args.max_timing_s, args.runtime)  # under ``device``
        self.models = ModelStore(capacity=max(4 * max_upload_bytes, 256 * 1024**2))
        self.device = threading.Lock()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING)
        self.uploads = threading.BoundedSemaphore(MAX_UPLOADS)
        self.queued = 0
        """Timing requests waiting for the device (changed under ``_counting``)."""
        self._counting = threading.Lock()
        self.fingerprint = fingerprint(threads, args.runtime)

    def count_waiting(self, change: int) -> None:
        with self._counting:
            self.queued += change

    def log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)

    def limits(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_memory_mb": self.timing.max_memory_mb,
            "max_timing_s": self.timing.max_seconds,
            "request_timeout_s": self.request_timeout_s,
            "body_bytes_per_s": BODY_BYTES_PER_S,
            "max_connections": MAX_CONNECTIONS,
            "listen_backlog": LISTEN_BACKLOG,
            "queue_wait_s": QUEUE_WAIT_S,
            "max_waiting_timings": MAX_WAITING,
        }


class _Handler(BaseHTTPRequestHandler):
    server_version = "prune-search-target/1"
    protocol_version = "HTTP/1.1"
    target: Target  # set on the class made for each server

    def setup(self) -> None:
        self.timeout = self.target.request_timeout_s
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, in this connection's thread, under its timeout
        self._reader = DeadlineReader(self.connection, self.target.request_timeout_s)
        self.rfile = io.BufferedReader(self._reader, 65536)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.target.request_timeout_s  # the request line and headers
        self._body_read = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` is answered only once the token is checked (else 401, and no body is read)."""
        try:
            self._authenticate()
        except Refused as refused:
            self._refuse(refused)
            return False
        return super().handle_expect_100()

    # -- dispatch ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle({f"{API}/info": self._info})

    def do_POST(self) -> None:
        self._handle({f"{API}/time": self._time})

    def do_PUT(self) -> None:
        self._handle({}, prefix=(f"{API}/models/", self._upload))

    def _handle(self, routes: dict[str, Any], prefix: tuple[str, Any] | None = None) -> None:
        try:
            self._authenticate()  # on the headers alone: nothing of the body is read before
            path = self.path.split("?", 1)[0]
            if path in routes:
                status, body = routes[path]()
            elif prefix is not None and path.startswith(prefix[0]):
                status, body = prefix[1](path[len(prefix[0]) :])
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.command} {path}")
        except Refused as refused:
            self._refuse(refused)
            return
        except Exception as exc:  # a fault of the service's own: say so and keep serving
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"}
            self.target.log(f"error {self.command} {self.path[:80]}: {type(exc).__name__}: {exc}")
        self._reply(status, body)

    def _refuse(self, refused: Refused) -> None:
        """Answer ``refused`` and close; a body not read is dropped for a moment so its client sees the answer."""
        self.close_connection = True  # never take an unread body for the next request
        self.target.log(f"refused {refused.status.value} {self.command} {self.path[:80]}: {refused}")
        self._reply(refused.status, {"error": str(refused), **refused.extra})
        if not self._body_read and (self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")):
            linger(self.connection)

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.connection.settimeout(self.target.request_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, too many or too long headers), as JSON too."""
        self.close_connection = True
        status = HTTPStatus(code)
        self.target.log(f"refused {code} from {self.client_address[0]}: {message or status.phrase}")
        self._reply(status, {"error": f"{message or status.phrase}" + (f" ({explain})" if explain else "")})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # every request that matters is logged by the handlers, in one plain line

    # -- checks --------------------------------------------------------------------------------

    def _authenticate(self) -> None:
        sent = self.headers.get("Authorization", "")
        token = sent.removeprefix("Bearer ").strip().encode()
        if not sent.startswith("Bearer ") or not hmac.compare_digest(token, self.target.token):
            raise Refused(HTTPStatus.UNAUTHORIZED, "missing or wrong token (send Authorization: Bearer TOKEN)")

    def _body(self, limit: int) -> bytes:
        """The request body, refused before it is read when it is larger than ``limit``."""
        if self.headers.get("Transfer-Encoding"):
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length_text)
        except ValueError:
            raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length < 0:
            raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length is negative")
        if length > limit:
            raise Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes; this target accepts at most {limit}",
                limit=limit,
            )
        self._body_read = True
        self._reader.deadline = time.monotonic() + self.target.request_timeout_s + length / BODY_BYTES_PER_S
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise Refused(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body of {length} bytes did not arrive within {self.target.request_timeout_s:g} s plus 1 s per "
                "MiB; send it faster",
            ) from None
        if len(data) != length:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the body ended after {len(data)} of {length} bytes")
        return data

    # -- endpoints -----------------------------------------------------------------------------

    def _info(self) -> tuple[HTTPStatus, dict[str, Any]]:
        t = self.target
        return HTTPStatus.OK, {
            "service": "prune-search latency target",
            "api": 1,
            "fingerprint": t.fingerprint,
            "fingerprint_id": fingerprint_id(t.fingerprint),
            "threads": t.settings.threads,
            "runtime": t.settings.runtime,
            "waiting": t.queued,
            "max_upload_bytes": t.max_upload_bytes,
            "limits": t.limits(),
        }

    def _upload(self, sha: str) -> tuple[HTTPStatus, dict[str, Any]]:
        t = self.target
        if not SHA256.match(sha):
            raise Refused(
                HTTPStatus.NOT_FOUND, "models are uploaded to /v1/models/<sha256 of the bytes, lower-case hex>"
            )
        if not t.uploads.acquire(blocking=False):
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "busy: other uploads are being read; retry shortly")
        try:
            data = self._body(t.max_upload_bytes)
        finally:
            t.uploads.release()
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refused(HTTPStatus.BAD_REQUEST, "the body's SHA-256 is not the one in the URL")
        try:
            check_upload(data, t.settings.runtime)
        except ModelRejected as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        with t.device:  # loading a model is CPU work: never while another is timed
            try:
                inputs = t.timing.inspect(data)
            except TimingFailed as exc:
                if exc.kind == "model":
                    raise Refused(HTTPStatus.BAD_REQUEST, f"{t.settings.runtime} cannot load it: {exc}") from None
                raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, f"model {sha[:12]} was not loaded: {exc}") from None
        if len(inputs) != 1:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the model has {len(inputs)} inputs; a CNN takes one image tensor")
        shape = inputs[0]
        t.models.put(sha, data, shape)
        t.log(f"stored model={sha[:12]} bytes={len(data)} input={shape}")
        return HTTPStatus.CREATED, {"sha256": sha, "input_shape": shape}

    def _time(self) -> tuple[HTTPStatus, dict[str, Any]]:
        t = self.target
        request = self._json()
        model_sha, reference_sha, shape = timing_request(request)
        missing = [s for s in (model_sha, reference_sha) if s is not None and t.models.get(s) is None]
        if missing:
            raise Refused(HTTPStatus.NOT_FOUND, "upload these models first", missing=missing)
        model, model_shape = t.models.get(model_sha)  # type: ignore[misc]
        check_shape(shape, model_shape, "the model")
        reference = None
        if reference_sha is not None:
            reference, reference_shape = t.models.get(reference_sha)  # type: ignore[misc]
            check_shape(shape, reference_shape, "the reference")
        if not t.waiting.acquire(blocking=False):
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {MAX_WAITING} timings are waiting; retry shortly")
        ref = f" reference={reference_sha[:12]}" if reference_sha else ""
        try:
            asked = time.monotonic()
            t.count_waiting(+1)
            with t.device:
                t.count_waiting(-1)
                queued_s = time.monotonic() - asked
                start = time.time()
                ref_named = (reference_sha, reference) if reference_sha and reference else None
                try:
                    latency = t.timing.time(shape, (model_sha, model), ref_named)
                except TimingFailed as exc:
                    t.log(f"not timed model={model_sha[:12]}{ref} input={shape}: {exc.kind}")
                    why = f"model {model_sha[:12]} was not timed: {exc}"
                    raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, why) from None
                end = time.time()
        finally:
            t.waiting.release()
        t.log(
            f"timed model={model_sha[:12]}{ref} input={shape} start={start:.6f} end={end:.6f} "
            f"median_ms={latency.median_ms:.4f} runs={latency.runs}"
        )
        return HTTPStatus.OK, {
            "median_ms": latency.median_ms,
            "p90_ms": latency.p90_ms,
            "runs": latency.runs,
            "stable": latency.stable,
            "reference_median_ms": latency.reference_median_ms,
            "reference_p90_ms": latency.reference_p90_ms,
            "ratio": latency.ratio,
            "queued_s": round(queued_s, 3),
            "fingerprint_id": fingerprint_id(t.fingerprint),
        }

    def _json(self) -> dict[str, Any]:
        try:
            value = json.loads(self._body(MAX_JSON_BYTES))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Refused(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not isinstance(value, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return value


def serve(args: argparse.Namespace, *, ready: threading.Event | None = None) -> int:
    """Run the service until interrupted; returns the exit status."""
    problem = argument_problem(args)
    if problem is not None:
        print(f"error: {problem}", flush=True)
        return 2
    try:
        token, created = load_or_create_token(args.token_file)
    except (OSError, ValueError) as exc:
        print(f"error: cannot use token file {args.token_file}: {exc}", flush=True)
        return 2
    target = Target(token, args)
    handler = type("Handler", (_Handler,), {"target": target})
    try:
        server = BoundedServer((args.host, args.port), handler, target.log)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", flush=True)
        return 2
    scheme = "http"
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"error: cannot load --tls-cert/--tls-key: {exc}", flush=True)
            return 2
        # the handshake happens in each connection's thread, under its timeout, not in the accepting one
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    host, port = server.server_address[:2]
    how = "created with a new token" if created else "existing"
    fp = target.fingerprint
    print(
        f"latency target listening on {scheme}://{host}:{port}/ ({fp['cpu']}, {args.threads} thread(s), "
        f"{args.runtime} {fp[args.runtime]}, fingerprint {fingerprint_id(fp)}); one model timed at a time",
        flush=True,
    )
    print(
        f"token file: {Path(args.token_file).expanduser()} ({how}); clients pass it as --target-token-file", flush=True
    )
    limits = target.limits()
    print(
        f"limits: {limits['max_memory_mb']} MiB and {limits['max_timing_s']:g} s per timing, uploads "
        f"{limits['max_upload_bytes'] // 1024**2} MiB, requests {limits['request_timeout_s']:g} s (+1 s per MiB "
        f"of body), {MAX_CONNECTIONS} connections at once and {LISTEN_BACKLOG} queued",
        flush=True,
    )
    try:
        target.timing.start()
    except RuntimeError as exc:
        print(f"error: {exc}", flush=True)
        server.server_close()
        return 2
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
        target.timing.stop()
    return 0

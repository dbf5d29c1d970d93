"""The HTTP connection, guarded against hostile clients: uvicorn's httptools protocol with a deadline per request.

uvicorn times out only reads between requests (keep-alive); a client that never sends a byte, or
sends part of a request and stalls, or trickles it, would hold its connection forever. Here:

- a whole request (request line, headers and body) must arrive within ``request_timeout`` seconds
  of the connection opening, or of the previous answer; a client still sending then gets a JSON
  408 and the connection is closed. The deadline stops when the body is complete, so the time the
  server itself takes (the queue for a slot, the models) never counts against the client;
- the request line and headers together may be at most ``max_header_bytes``: a JSON 431, and the
  connection is closed as soon as more arrived, before the parser buffers any further;
- beyond ``max_connections`` open connections, or ``max_requests`` requests in the server at
  once, a request is answered with a JSON 503 and ``Retry-After`` (its body is read and dropped by
  the parser, so the client reads the answer instead of a reset connection);
- a request the parser cannot read is a JSON 400, not uvicorn's plain text.

Every answer written here is ``{"error": ...}``, as the app's are.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["Guard", "guarded_protocol", "json_error"]

log = logging.getLogger(__name__)

_LINGER_S = 1.0
"""After a refusal, how long what the client still sends is read and dropped before the connection closes."""

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Guard:
    """What one connection, and the server as a whole, may take."""

    request_timeout: float = 30.0
    """Seconds for a whole request to arrive (from the connection, or the previous answer)."""
    max_header_bytes: int = 64 * 1024
    max_connections: int = 256
    max_requests: int = 128
    """Requests in the server at once (queued for a slot or running); more are answered 503."""
    retry_after_s: int = 1


def json_error(status: int, message: str, *, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response: ``{"error": message}`` with ``status``, closing the connection."""
    body = json.dumps({"error": message}).encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _overloaded_app(guard: Guard) -> Any:
    message = json.dumps(
        {"error": "the server is busy (too many connections or requests at once); retry after a second"}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(message)).encode()),
        (b"retry-after", str(guard.retry_after_s).encode()),
    ]

    async def overloaded(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": message})

    return overloaded


def guarded_protocol(guard: Guard) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol under ``guard`` (pass it as ``uvicorn.Config(http=...)``)."""
    overloaded = _overloaded_app(guard)

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._app = self.app
            self._deadline: asyncio.TimerHandle | None = None
            self._arrived = False  # the current request's body is complete
            self._heading = True  # still reading a request line and headers
            self._head_bytes = 0
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # what a refused client still sends is read and dropped until it closes (or a second)
            if self._heading:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._heading and self._head_bytes > guard.max_header_bytes and not self._refused:
                self._refuse(
                    431,
                    f"the request line and headers are over {guard.max_header_bytes // 1024} KB; send smaller "
                    "headers (or start serve with a larger --max-header-kb)",
                )

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "the request is not valid HTTP/1.1; send a well-formed request")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arrived = False

        def on_headers_complete(self) -> None:
            self._heading = False
            busy = len(self.connections) > guard.max_connections or len(self.tasks) >= guard.max_requests
            self.app = overloaded if busy else self._app
            if busy:
                log.warning("overloaded: %d connections, %d requests", len(self.connections), len(self.tasks))
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._arrived, self._heading, self._head_bytes = True, True, 0
            if self.cycle is not None and self.cycle.response_complete:
                self._arm()  # answered early (413, 503): the next request's clock starts now
            else:
                self._disarm()  # the server's own time from here on

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._arrived and not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(guard.request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self._refused or self.transport.is_closing():
                return
            if not self._heading and self.cycle is not None and self.cycle.response_started:
                self.transport.close()  # an answer went out already; the rest of its body never came
                return
            self._refuse(
                408,
                f"the request did not arrive within {guard.request_timeout:g} s; send it whole and promptly "
                "(or start serve with a longer --request-timeout)",
            )

        def _refuse(self, status: int, message: str) -> None:
            """Answer ``status`` and close; a client still sending reads the answer rather than a reset."""
            self._disarm()
            self._refused = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's answer, if any, is not written after this one
            self.transport.write(json_error(status, message))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

    return GuardedProtocol

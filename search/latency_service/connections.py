"""How the latency target holds connections: a bounded number at once, a queue, deadlines, one-line logs.

* :data:`MAX_CONNECTIONS` are served at once (one thread each); more wait in the listen backlog
  (:data:`LISTEN_BACKLOG` connections) for up to :data:`QUEUE_WAIT_S`, then get a JSON 503 with
  ``Retry-After``. The kernel resets none of them.
* :class:`DeadlineReader`: every read from a client waits at most until the current deadline
  (the headers', then the body's), so a client that trickles bytes holds nothing for long.
* A client that goes away early is one line in the log, never a traceback.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

__all__ = ["LISTEN_BACKLOG", "MAX_CONNECTIONS", "QUEUE_WAIT_S", "BoundedServer", "DeadlineReader", "linger"]

MAX_CONNECTIONS = 64
"""Connections served at once, each by its own thread."""
LISTEN_BACKLOG = 128
"""Connections the kernel queues for the service beyond those (the listen backlog)."""
QUEUE_WAIT_S = 10.0
"""How long a connection past :data:`MAX_CONNECTIONS` waits for one to end before it gets a 503."""
LINGER_S = 2.0
"""After refusing a request, how long the service drops what its client is still sending (so it sees the answer)."""
LINGER_BYTES = 64 * 1024**2


class DeadlineReader(socket.SocketIO):
    """A socket's reading side whose every read waits at most ``idle_s``, and never past ``deadline``."""

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        super().__init__(sock, "rb")
        self.idle_s = idle_s
        self.deadline: float | None = None

    def readinto(self, buffer: Any) -> int | None:
        wait = self.idle_s
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the deadline passed")
        self._sock.settimeout(wait)
        return super().readinto(buffer)


def linger(connection: socket.socket) -> None:
    """Half-close ``connection`` and drop, for a bounded time, what its client still sends (never kept)."""
    try:
        connection.shutdown(socket.SHUT_WR)
        end, dropped = time.monotonic() + LINGER_S, 0
        while dropped < LINGER_BYTES and (left := end - time.monotonic()) > 0:
            connection.settimeout(min(0.25, left))  # a client that pauses is not sending a body
            chunk = connection.recv(65536)
            if not chunk:
                break
            dropped += len(chunk)
    except OSError:
        pass


class BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server with a bounded number of threads, a deep backlog and one-line errors."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, log: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._log = log
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=QUEUE_WAIT_S):
            self._busy(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _busy(self, request: Any, client_address: Any) -> None:
        body = json.dumps(
            {"error": f"busy: {MAX_CONNECTIONS} connections are being served; retry shortly", "retry_after_s": 1}
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self._log(f"refused 503 connection from {client_address[0]}: {MAX_CONNECTIONS} connections at once")
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self._log(f"client {client_address[0]} went away early ({type(error).__name__})")
        else:
            self._log(f"error serving {client_address[0]}: {type(error).__name__}: {error}")

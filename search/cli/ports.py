"""Listening sockets for the commands that serve (``serve``, ``dashboard``): a taken or impossible address is
a one-line error before anything starts."""

from __future__ import annotations

import errno
import socket

from search.errors import UsageError

__all__ = ["bind", "check_port"]


def check_port(port: int, lowest: int = 0) -> None:
    """Refuse a port number outside ``lowest``..65535."""
    if not lowest <= port <= 65535:
        raise UsageError(f"--port must be {lowest}..65535, got {port}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line error naming what is wrong."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # in use, an address this machine does not have, a name that does not resolve
        sock.close()
        reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror or exc})"
        raise UsageError(f"{host}:{port} {reason}; pass another --port (or --host)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

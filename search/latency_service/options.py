"""The latency target's command-line options and its token file (refused unless only its owner can read it)."""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from pathlib import Path

from search.measuring.timing_process import default_memory_mb

__all__ = [
    "BODY_BYTES_PER_S",
    "DEFAULT_PORT",
    "DEFAULT_TOKEN_FILE",
    "add_arguments",
    "argument_problem",
    "load_or_create_token",
]

DEFAULT_PORT = 8765
DEFAULT_TOKEN_FILE = "~/.config/prune-search/target.token"
BODY_BYTES_PER_S = 1024**2
"""A body gets ``--request-timeout-s`` plus one second per this many bytes to arrive."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The service's options (shared by ``cli.py target`` and ``python -m search.latency_service``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks one)")
    parser.add_argument("--threads", type=int, default=1, help="the runtime's threads (default: 1)")
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino", "executorch"),
        default="onnxruntime",
        help="the runtime that times: onnxruntime (default), openvino or executorch; install only that one",
    )
    parser.add_argument(
        "--token-file",
        default=DEFAULT_TOKEN_FILE,
        help="file holding the token clients must send; created with a new random token (mode 0600) "
        f"when missing (default: {DEFAULT_TOKEN_FILE})",
    )
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest model accepted, in MB (default: 512)")
    parser.add_argument(
        "--max-memory-mb",
        type=int,
        default=default_memory_mb(),
        help="memory a model may use while it is loaded and timed, in MiB; a model that needs more is refused "
        "(default: half this machine's memory, at most 8192)",
    )
    parser.add_argument(
        "--max-timing-s",
        type=float,
        default=30.0,
        help="longest a whole timing may take, loading and warm-up included; a slower model is stopped and "
        "refused (default: 30)",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=30.0,
        help="headers must arrive within this many seconds, a body within this plus 1 s per MiB (default: 30)",
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM); needs --tls-key")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the service's options (one line), or None."""
    checks = [
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (args.max_upload_mb > 0, f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}"),
        (0 <= args.port <= 65535, f"--port must be 0..65535, got {args.port}"),
        (args.max_memory_mb >= 512, f"--max-memory-mb must be >= 512, got {args.max_memory_mb}"),
        (args.max_timing_s > 0, f"--max-timing-s must be > 0, got {args.max_timing_s:g}"),
        (args.request_timeout_s > 0, f"--request-timeout-s must be > 0, got {args.request_timeout_s:g}"),
    ]
    wrong = [message for ok, message in checks if not ok]
    if wrong:
        return "; ".join(wrong)
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    from search.errors import UsageError
    from search.measuring.runtimes.registry import require_runtime

    try:
        require_runtime(args.runtime)
    except UsageError as exc:
        return str(exc)
    return None


def load_or_create_token(path: str | Path) -> tuple[str, bool]:
    """The token in ``path``, or a new random one written there (mode 0600); and whether it was created."""
    file = Path(path).expanduser()
    if file.exists():
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode & 0o077:
            raise ValueError(
                f"it is readable or writable by other users (mode {mode:04o}); the token must be private: "
                f"run `chmod 600 {file}`"
            )
        token = file.read_text().strip()
        if len(token) < 16:
            raise ValueError(f"token file {file} holds no token of at least 16 characters; delete it to make one")
        return token, False
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, True

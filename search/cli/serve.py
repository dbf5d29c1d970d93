"""``cli.py serve``: a web page and a JSON API for top-k predictions of exported models (:mod:`search.serving`)."""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from search.cli.options import add_runtime_option, positive_float, positive_int
from search.cli.ports import bind, check_port
from search.errors import UsageError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "serve exported models: a web page and a JSON API for top-3 predictions, beside the unpruned model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("exports", nargs="+", metavar="EXPORT_DIR", help="export folders (`export` writes OUT/trial-N)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also serve the study's unpruned model, exported to ONNX the same way, so every answer can be compared",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="the runtime's threads per model session (default: 1; requests run side by side on the "
        "cores, cores / threads at a time)",
    )
    add_runtime_option(parser, "the runtime to serve in, its shipped file (default: the one each export was timed in)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest upload (default: 20 MB)")
    parser.add_argument(
        "--max-megapixels", type=positive_float, default=40.0, help="largest image, decoded (default: 40 megapixels)"
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a whole request (headers and body) may take to arrive, from the connection or the previous "
        "answer; a slower client gets 408 (default: 30)",
    )
    parser.add_argument(
        "--max-header-kb", type=positive_int, default=64, help="largest request line and headers (default: 64 KB; 431)"
    )
    parser.add_argument(
        "--max-decode-mb",
        type=positive_float,
        default=400.0,
        help="memory one request's image may take decoded and converted to RGB, judged from its header "
        "(default: 400 MB; 413)",
    )
    parser.add_argument(
        "--max-decode-total-mb",
        type=positive_float,
        default=800.0,
        help="memory the images of all requests in flight may take together; others wait (default: 800 MB)",
    )
    parser.add_argument(
        "--max-upload-total-mb",
        type=positive_float,
        default=400.0,
        help="memory the uploads of all requests in flight may take together, each twice its size; more are "
        "answered 503 (default: 400 MB)",
    )
    parser.add_argument(
        "--max-connections", type=positive_int, default=256, help="open connections before 503 (default: 256)"
    )
    parser.add_argument(
        "--max-requests",
        type=positive_int,
        default=128,
        help="requests in the server at once, queued or running, before 503 (default: 128)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--storage", help="with --baseline: the study's SQLAlchemy URL (default: its SQLite file)")
    parser.add_argument("--studies-dir", default="studies", help="with --baseline: folder of the study databases")
    parser.add_argument("--weights", help="with --baseline: a copy of the study's baseline file, if it moved")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only errors and the address")


def run(args: argparse.Namespace, console: Console) -> int:
    import warnings
    from pathlib import Path

    import uvicorn
    from PIL import Image

    from search.cli.console import RichReporter
    from search.serving.app import Limits, create_app
    from search.serving.guard import Guard, guarded_protocol
    from search.serving.models import load_export

    check_port(args.port)
    if args.max_decode_total_mb < args.max_decode_mb:
        raise UsageError(
            f"--max-decode-total-mb ({args.max_decode_total_mb:g}) must be at least --max-decode-mb "
            f"({args.max_decode_mb:g}): one request's image must fit in what all may take"
        )
    if args.max_upload_total_mb < 2 * args.max_upload_mb:
        raise UsageError(
            f"--max-upload-total-mb ({args.max_upload_total_mb:g}) must be at least twice --max-upload-mb "
            f"({args.max_upload_mb:g}): an upload takes twice its size while it is read"
        )
    if not args.baseline and (args.storage or args.weights):
        raise UsageError("--storage and --weights go with --baseline")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slots = max(1, cores // args.threads)
    models = [load_export(Path(folder), args.threads, args.runtime) for folder in args.exports]
    names = [m.name for m in models]
    if len(set(names)) != len(names):  # the same trial number from two studies
        for m in models:
            m.name = f"{m.study}-{m.name}"
    if len({m.name for m in models}) != len(models):
        raise UsageError("the same export is named twice; pass each export folder once")
    if args.baseline:
        from search.serving.baseline import baseline_model

        with RichReporter(console, verbose=not args.quiet) as reporter:
            models.append(
                baseline_model(
                    models,
                    args.storage,
                    args.threads,
                    runtime=models[0].runtime,
                    studies_dir=Path(args.studies_dir),
                    weights=args.weights,
                    reporter=reporter,
                )
            )
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1e6),
        max_upload_total=int(args.max_upload_total_mb * 1e6),
        max_pixels=int(args.max_megapixels * 1e6),
        slots=slots,
        max_decode_bytes=int(args.max_decode_mb * 1e6),
        max_decode_total=int(args.max_decode_total_mb * 1e6),
    )
    guard = Guard(
        request_timeout=args.request_timeout,
        max_header_bytes=args.max_header_kb * 1024,
        max_connections=args.max_connections,
        max_requests=args.max_requests,
    )
    about = {"workers": 1, "slots": slots, "threads_per_session": args.threads}
    app = create_app(models, limits, about=about)
    # Pillow warns of large images; the server refuses them itself (--max-megapixels), so one warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not args.quiet:
        for m in models:
            pre = m.preprocessing
            console.print(
                f"{m.name}: {m.role}, {m.precision}, {m.file}; {len(pre.classes)} classes at {pre.input_size}px"
            )
        console.print(
            f"uvicorn: 1 worker process (every model loaded once, one session each), {slots} request(s) at a "
            f"time x {args.threads} {', '.join(sorted({m.runtime for m in models}))} thread(s) per session on {cores} "
            f"CPU(s); uploads up to "
            f"{args.max_upload_mb:g} MB ({args.max_upload_total_mb:g} MB for all at once) and "
            f"{args.max_megapixels:g} megapixels, {args.max_decode_mb:g} MB decoded "
            f"({args.max_decode_total_mb:g} MB for all at once); a request must arrive within "
            f"{args.request_timeout:g} s, headers up to {args.max_header_kb} KB; {args.max_connections} connections "
            f"and {args.max_requests} requests at once"
        )
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving on http://{shown}:{port}/ (API: /predict, /models, /health, /openapi.json); Ctrl-C stops")
    config = uvicorn.Config(
        app,
        workers=1,
        access_log=args.access_log,
        log_level="info" if args.access_log else "warning",
        http=guarded_protocol(guard),  # deadlines, header cap and JSON 503s instead of limit_concurrency's
        timeout_keep_alive=5,
        server_header=False,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl-C, then raised it again
        pass
    console.print("serve stopped")
    return 0

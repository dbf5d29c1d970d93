"""A bounded concurrent load on a running server: ``clients`` keep-alive connections posting one image.

Run it in a process of its own (the tests and ``benchmarks/serve.py`` do), so the client's work
is not the server's: each client thread sends its next request when the last one is answered,
for ``seconds`` or until ``requests`` are done, and records every status and latency.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

__all__ = ["run_load"]


def run_load(
    url: str,
    body: bytes,
    *,
    content_type: str = "application/octet-stream",
    clients: int = 8,
    seconds: float | None = None,
    requests: int | None = None,
    path: str = "/predict?k=3",
) -> dict[str, Any]:
    """Load ``url`` with ``clients`` concurrent clients; returns counts, throughput and latency percentiles.

    Stops after ``seconds`` (the requests in flight finish) or after ``requests`` in all.
    """
    if (seconds is None) == (requests is None):
        raise ValueError("give exactly one of seconds and requests")
    where = urlsplit(url)
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    answers: set[str] = set()
    inside: list[tuple[float, float]] = []
    """Per answer: the server's own milliseconds (decode, preprocess, models) and those in ONNX Runtime."""
    failures: list[str] = []
    budget = [requests if requests is not None else 0]
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    def take() -> bool:
        with lock:
            if requests is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
                return True
        return time.perf_counter() < deadline

    def client() -> None:
        connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=60)
        while take():
            sent = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": content_type})
                reply = connection.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=60)
                continue
            took = time.perf_counter() - sent
            with lock:
                latencies.append(took)
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if reply.status == 200:
                    answer = json.loads(data)
                    answers.add(json.dumps([m["top"][0]["label"] for m in answer["models"]]))
                    inside.append((answer["total_ms"], sum(m["inference_ms"] for m in answer["models"])))
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 3) if ordered else None

    return {
        "clients": clients,
        "seconds": round(wall, 3),
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / wall, 2) if wall > 0 else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures[:5],
        "failed": len(failures),
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "distinct_top1": sorted(answers),
        "server_ms_mean": round(sum(t for t, _ in inside) / len(inside), 3) if inside else None,
        "inference_ms_mean": round(sum(i for _, i in inside) / len(inside), 3) if inside else None,
    }

"""``cli.py serve`` against hostile clients: the running server, traffic from this process on loopback.

Idle and slow connections, a huge header, formats outside the allowlist, 16-bit images that
multiply memory, malformed requests and overload: each is sent to a real ``cli.py serve`` process,
bounded in count and time, and every answer must be JSON while other clients are still served.
"""

from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_main

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
"""The server's --request-timeout here."""
MAX_CONNECTIONS = 100


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, digits32: Any) -> Path:
    """A small real export folder: a tiny classifier for digits at 32 px, its ONNX file and card."""
    import torch
    from torch import nn

    from search.measuring.onnx_export import export_onnx
    from search.shipping.preprocessing import preprocessing_record

    folder = tmp_path_factory.mktemp("hostile") / "trial-0"
    folder.mkdir()
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, len(digits32.classes))).eval()
    (folder / "model.onnx").write_bytes(export_onnx(model, torch.zeros(1, 3, 32, 32), dynamic_batch=True))
    card = {"study": "hostile", "trial": 0, "precision": "fp32", "preprocessing": preprocessing_record(digits32)}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _start(export: Path, *options: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "serve", str(export), "--port", "0", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving on "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
            return proc, int(line.split()[2].rstrip("/").rsplit(":", 1)[1])
    raise AssertionError(f"serve did not start (exit {proc.wait()}): {''.join(lines)}")


@pytest.fixture(scope="module")
def server(export: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc, port = _start(
        export,
        "--request-timeout",
        str(TIMEOUT_S),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-decode-total-mb",
        "400",
    )
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


DIGIT = _png(np.tile(np.arange(8, dtype=np.uint8)[None, :] * 30, (8, 1)))


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_answer(sock: socket.socket, deadline: float) -> tuple[int | None, dict[str, str], bytes]:
    """Status, headers and body of one answer (None: the connection closed with no answer)."""
    data = b""
    while time.monotonic() < deadline:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                return int(lines[0].split()[1]), headers, rest[:length]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return None, {}, data


def _request(port: int, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int | None, Any, float]:
    """One request on a new connection: status, JSON body and seconds taken."""
    started = time.monotonic()
    with _connect(port) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
        sock.sendall(head.encode() + body)
        status, found, data = _read_answer(sock, started + 20)
    assert status is None or found.get("content-type") == "application/json", (status, found, data[:200])
    return status, (json.loads(data) if status is not None else None), time.monotonic() - started


def test_idle_and_slow_clients_time_out_per_request_while_others_are_served(server: Any) -> None:
    _, port = server
    idle = [_connect(port) for _ in range(80)]  # more than uvicorn's old limit of 64, never a byte
    stalled = []
    for _ in range(8):  # headers and part of a body, then nothing
        sock = _connect(port)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        sock.sendall(DIGIT[:50])
        stalled.append(sock)
    trickle = _connect(port)  # one header byte every 0.2 s: each read is prompt, the request never ends
    opened = time.monotonic()
    trickled: list[float] = []

    def slowloris() -> None:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
        for byte in request:
            if time.monotonic() - opened > 4 * TIMEOUT_S:
                return
            try:
                trickle.send(bytes([byte]))
            except OSError:
                trickled.append(time.monotonic() - opened)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=slowloris, daemon=True)
    thread.start()
    try:
        # Meanwhile everyone else is served, at once.
        status, body, took = _request(port, "GET", "/health")
        assert status == 200 and body["status"] == "ok" and took < 3.0, (status, body, took)
        status, body, took = _request(port, "POST", "/predict", DIGIT, "Content-Type: image/png\r\n")
        assert status == 200 and body["models"][0]["top"], (status, body)

        # The silent and the stalled are answered 408 (JSON) within the deadline, and closed.
        for sock in idle[:5] + stalled:
            status, headers, data = _read_answer(sock, opened + TIMEOUT_S + 3)
            assert status == 408 and headers["content-type"] == "application/json", (status, data)
            assert "did not arrive within 2 s" in json.loads(data)["error"]
        for sock in idle[5:]:
            sock.settimeout(max(0.01, opened + TIMEOUT_S + 3 - time.monotonic()))
            assert sock.recv(65536).startswith(b"HTTP/1.1 408"), "every idle connection is timed out"
        status, _, data = _read_answer(trickle, opened + TIMEOUT_S + 3)
        assert status == 408, "a request trickled a byte at a time is timed out as a whole, not per read"
        assert time.monotonic() - opened < TIMEOUT_S + 3
    finally:
        for sock in [*idle, *stalled, trickle]:
            sock.close()
        thread.join(timeout=10)
    assert _request(port, "GET", "/health")[0] == 200


def test_a_huge_header_is_refused_431_in_json_without_slowing_others(server: Any) -> None:
    _, port = server
    big = _connect(port)
    big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk, sent, answered = b"a" * 65536, 0, False
    started = time.monotonic()
    try:
        while sent < 20_000_000 and time.monotonic() - started < 10:  # at most 20 MB, 10 s
            if select.select([big], [], [], 0)[0]:
                answered = True
                break
            try:
                big.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        took = time.monotonic() - started
        status, headers, data = _read_answer(big, time.monotonic() + 5)
    finally:
        big.close()
    assert status == 431 and headers["content-type"] == "application/json", (status, data[:200])
    assert "headers are over 64 KB" in json.loads(data)["error"]
    # Refused as soon as the cap passed: what more was sent lies in the loopback's socket buffers.
    assert answered and took < 3.0 and sent < 8_000_000, f"answered after {took:.1f} s and {sent} bytes"
    status, _, took = _request(port, "GET", "/health")
    assert status == 200 and took < 3.0


def test_only_the_listed_formats_are_decoded_the_rest_is_415(server: Any) -> None:
    _, port = server
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
        b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    )
    icon = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(icon, format="ICO")
    for name, data in [("eps", eps), ("ico", icon.getvalue())]:
        status, body, _ = _request(port, "POST", "/predict", data, "Content-Type: application/octet-stream\r\n")
        assert status == 415 and "JPEG, PNG, WebP, GIF, BMP or TIFF" in body["error"], (name, status, body)
    webp = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(webp, format="WEBP")
    assert _request(port, "POST", "/predict", webp.getvalue())[0] == 200, "a listed format still decodes"


def _rss(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def test_16_bit_images_are_bounded_in_memory_per_request_and_in_total(server: Any) -> None:
    proc, port = server
    sixteen = io.BytesIO()  # 6300x6300 16-bit: a small file, about 1 GB to decode and convert before
    Image.fromarray(np.zeros((6300, 6300), dtype=np.uint16)).save(sixteen, format="PNG")
    data = sixteen.getvalue()
    assert len(data) < 1_000_000
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak RSS starts again from now
    before = _rss(proc.pid)["VmRSS"]
    results: list[Any] = []

    def upload() -> None:
        results.append(_request(port, "POST", "/predict", data, "Content-Type: image/png\r\n"))

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    peak = _rss(proc.pid)["VmHWM"] - before
    assert [r[0] for r in results] == [200] * 4, results
    assert all(r[1]["image"]["mode"] == "I;16" for r in results)
    assert peak < 600e6, f"four 16-bit uploads at once raised the server's peak RSS by {peak / 1e6:.0f} MB"


def test_malformed_requests_and_overload_are_answered_in_json(server: Any) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, data = _read_answer(sock, time.monotonic() + 5)
    assert status == 400 and "not valid HTTP" in json.loads(data)["error"], (status, data)

    # 70 uploads at once: every one is answered (none closed unanswered), all 200.
    barrier = threading.Barrier(70)
    results: list[Any] = []

    def upload() -> None:
        with _connect(port, timeout=60) as sock:
            barrier.wait(timeout=30)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(DIGIT)}\r\n\r\n".encode()
                + DIGIT
            )
            results.append(_read_answer(sock, time.monotonic() + 60))

    threads = [threading.Thread(target=upload) for _ in range(70)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(str(r[0]) for r in results) == ["200"] * 70, [r[:2] for r in results if r[0] != 200][:3]

    # Past the connection limit: an orderly JSON 503 with Retry-After, and served again once the idle time out.
    idle = [_connect(port) for _ in range(MAX_CONNECTIONS + 5)]
    try:
        with _connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, data = _read_answer(sock, time.monotonic() + 5)
        assert status == 503 and headers.get("retry-after") == "1" and "busy" in json.loads(data)["error"], data
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert _request(port, "GET", "/health")[0] == 200


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_uploads_in_flight_are_bounded_in_memory_together_and_the_rest_get_503(export: Path) -> None:
    """5 MB uploads, 20 MB for all at once (each counted twice): 40 at once peak near 20 MB, not 200."""
    proc, port = _start(
        export, "--request-timeout", str(TIMEOUT_S), "--max-upload-mb", "5", "--max-upload-total-mb", "20"
    )
    try:
        for _ in range(3):  # warm: what the first answers allocate is not the uploads' memory
            assert _request(port, "POST", "/predict", DIGIT, "Content-Type: image/png\r\n")[0] == 200
        before = _peak_rss_kb(proc.pid)

        # Two clients declare 4.9 MB and stall: 19.6 MB held. A third is refused at once, in JSON, with
        # Retry-After; a small image still fits and is served.
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 4900000\r\n\r\n"
        stalled = [_connect(port) for _ in range(2)]
        for sock in stalled:
            sock.sendall(head + b"x" * 1000)
        time.sleep(0.3)
        started = time.monotonic()
        with _connect(port) as sock:
            sock.sendall(head + b"x" * 1000)
            status, headers, data = _read_answer(sock, started + 5)
        assert status == 503 and headers.get("retry-after") == "1", (status, data)
        assert "uploads" in json.loads(data)["error"] and time.monotonic() - started < 1.5
        status, body, _ = _request(port, "POST", "/predict", DIGIT, "Content-Type: image/png\r\n")
        assert status == 200 and body["models"][0]["top"], (status, body)
        for sock in stalled:  # they time out (408) and give their room back
            assert _read_answer(sock, time.monotonic() + TIMEOUT_S + 3)[0] == 408
            sock.close()

        # 40 clients send 4.9 MB each at once: each is answered (415 for these bytes, or 503), and the
        # server's peak memory grows by about the budget, not by the 196 MB sent.
        body_bytes = bytes(4_900_000)
        answers: list[Any] = []

        def upload() -> None:
            with _connect(port, timeout=30) as sock:
                try:
                    sock.sendall(head + body_bytes)
                except OSError:  # refused before it was all sent
                    pass
                answers.append(_read_answer(sock, time.monotonic() + 30)[0])

        threads = [threading.Thread(target=upload) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(answers) == 40 and set(answers) <= {415, 503} and 415 in answers, sorted(map(str, answers))
        grown_mb = (_peak_rss_kb(proc.pid) - before) / 1000
        assert grown_mb < 80, f"the server's peak memory grew by {grown_mb:.0f} MB for uploads capped at 20 MB"
        assert _request(port, "POST", "/predict", DIGIT, "Content-Type: image/png\r\n")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serving_an_export_loads_no_torch(export: Path) -> None:
    """The server needs its runtime, not PyTorch: importing torch alone takes about 500 MB and a second or two."""
    probe = (
        "import sys; from pathlib import Path; "
        "from search.cli.main import main; from search.serving.app import Limits, create_app; "
        "from search.serving.models import load_export; "
        f"create_app([load_export(Path({str(export)!r}), 1, None)], Limits()); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", "serve imported torch"


def test_limits_that_contradict_each_other_are_a_usage_error(export: Path) -> None:
    done = run_main("serve", str(export), "--max-decode-mb", "500", "--max-decode-total-mb", "100")
    assert done.returncode == 2 and "--max-decode-total-mb (100) must be at least --max-decode-mb (500)" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_main("serve", str(export), "--max-upload-mb", "30", "--max-upload-total-mb", "50")
    assert done.returncode == 2
    assert "--max-upload-total-mb (50) must be at least twice --max-upload-mb (30)" in done.stderr
    done = run_main("serve", str(export), "--request-timeout", "0")
    assert done.returncode == 2 and "--request-timeout" in done.stderr and "Traceback" not in done.stderr

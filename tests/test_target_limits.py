"""The latency target under hostile traffic (issue 24, items 7-13): the running service process, driven from
this one over loopback with bounded traffic (oversized, slow, idle, unauthenticated, concurrent), keeps serving."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_target import Target, _no_torch_env, _request, _start

onnx = pytest.importorskip("onnx")
helper, TensorProto = onnx.helper, onnx.TensorProto


def conv_model(side: int, out_channels: int, in_channels: int = 1, kernel: int = 1) -> bytes:
    """A one-Conv ONNX model taking 1 x in_channels x side x side: a few hundred bytes, tensors as large as asked."""
    weights = [0.01] * (out_channels * in_channels * kernel * kernel)
    w = helper.make_tensor("w", TensorProto.FLOAT, [out_channels, in_channels, kernel, kernel], weights)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[kernel // 2] * 4)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


SMALL = conv_model(32, 4)


def _serve(tmp: Path, *options: str) -> Target:
    token_file = tmp / "token"
    argv = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file), "--port", "0", *options]
    return _start(argv, _no_torch_env(tmp), token_file)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The service as a user starts it: default options, on loopback, no torch importable."""
    started = _serve(tmp_path_factory.mktemp("plain"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The service with tight limits, so that a test reaches them in seconds."""
    options = ["--max-memory-mb", "1536", "--max-timing-s", "3", "--request-timeout-s", "2"]
    started = _serve(tmp_path_factory.mktemp("bounded"), *options)
    yield started
    started.stop()


def _address(target: Target) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(target.url)
    return parts.hostname or "127.0.0.1", parts.port or 0


def _upload(target: Target, model: bytes) -> str:
    sha = hashlib.sha256(model).hexdigest()
    status, answer = _request(target, "PUT", f"/v1/models/{sha}", model)
    assert status == 201, answer
    return sha


def _time(target: Target, sha: str, shape: list[int]) -> tuple[int, dict, float]:
    started = time.monotonic()
    body = json.dumps({"model": sha, "reference": None, "input_shape": shape}).encode()
    status, answer = _request(target, "POST", "/v1/time", body)
    return status, answer, time.monotonic() - started


def _raw(target: Target, head: str, timeout: float = 10.0) -> socket.socket:
    """A connection that has sent ``head`` (request line and headers) and nothing more."""
    sock = socket.create_connection(_address(target), timeout=timeout)
    sock.sendall(head.encode())
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the service sends until it closes (or the socket's timeout)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionError):
        pass
    return got


def _serving(target: Target) -> None:
    assert target.process.poll() is None, "the service is still running"
    status, answer, took = _time(target, _upload(target, SMALL), [1, 1, 32, 32])
    assert status == 200 and answer["median_ms"] > 0 and took < 15, "and still times models"


def test_a_model_whose_tensors_exceed_the_memory_bound_is_refused_and_the_service_keeps_serving(
    bounded: Target,
) -> None:
    huge = conv_model(2048, 1024)  # a 4.5 KB model, a 16 MiB input, and an output of 16 GiB
    assert len(huge) < 6000
    status, answer, took = _time(bounded, _upload(bounded, huge), [1, 1, 2048, 2048])
    assert status == 422, answer
    assert "1536 MiB" in answer["error"] and "--max-memory-mb" in answer["error"], answer["error"]
    assert took < 60
    _, info = _request(bounded, "GET", "/v1/info")
    assert info["limits"]["max_memory_mb"] == 1536
    _serving(bounded)


def test_a_slow_model_is_stopped_at_the_limit_for_the_whole_timing_and_does_not_hold_the_queue(
    bounded: Target,
) -> None:
    slow = conv_model(512, 64, in_channels=64, kernel=3)  # a few hundred ms a run: warm-up alone exceeds 3 s
    sha, small = _upload(bounded, slow), _upload(bounded, SMALL)
    behind: list[tuple[int, float]] = []

    def queued() -> None:
        time.sleep(0.5)
        status, _, took = _time(bounded, small, [1, 1, 32, 32])
        behind.append((status, took))

    waiter = threading.Thread(target=queued)
    waiter.start()
    status, answer, took = _time(bounded, sha, [1, 64, 512, 512])
    waiter.join(timeout=60)
    assert status == 422 and "3 s" in answer["error"] and "--max-timing-s" in answer["error"], answer
    assert took < 8, f"the slow model held the device for {took:.1f} s"
    assert behind and behind[0][0] == 200 and behind[0][1] < 10, f"the timing queued behind it: {behind}"
    _serving(bounded)


def test_twenty_clients_at_once_are_queued_not_reset(plain: Target) -> None:
    if shutil.which("ss"):
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{_address(plain)[1]}"], capture_output=True, text=True, timeout=10
        ).stdout.split()
        assert int(listening[2]) >= 128, f"listen backlog {listening[2]} (ss Send-Q)"
    start = threading.Barrier(20)

    def client(_: int) -> list[int]:
        start.wait(timeout=30)
        with ThreadPoolExecutor(4) as each:
            return list(each.map(lambda _: _request(plain, "GET", "/v1/info")[0], range(4)))

    with ThreadPoolExecutor(20) as clients:
        statuses = [s for got in clients.map(client, range(20)) for s in got]
    assert statuses == [200] * 80
    _, info = _request(plain, "GET", "/v1/info")
    assert info["limits"]["listen_backlog"] >= 128 and info["limits"]["max_connections"] == 64


def test_an_upload_without_the_token_is_refused_before_its_body(plain: Target) -> None:
    path = f"/v1/models/{'a' * 64}"
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-wrong\r\nContent-Length: {16 << 20}\r\n"
    )
    with _raw(plain, head + "Expect: 100-continue\r\n\r\n", timeout=5) as sock:
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 401"), f"no 100 Continue for a wrong token: {answer[:80]!r}"
    assert b'"error"' in answer
    sha = hashlib.sha256(SMALL).hexdigest()
    valid = f"PUT /v1/models/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {plain.token}\r\n"
    with _raw(plain, valid + f"Content-Length: {len(SMALL)}\r\nExpect: 100-continue\r\n\r\n", timeout=10) as sock:
        assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue"), "the right token is invited to send its body"
        sock.sendall(SMALL)
        got = b""
        while b"input_shape" not in got and (chunk := sock.recv(4096)):
            got += chunk
        assert got.lstrip().startswith(b"HTTP/1.1 201"), got

    # 300 uploads with a wrong token, their bodies never sent: each is answered 401 at once.
    started = time.monotonic()
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: _answer(_raw(plain, head + "\r\n", timeout=10))[:12], range(300)))
        status, _ = _request(plain, "GET", "/v1/info")
    assert answers == [b"HTTP/1.1 401"] * 300
    assert status == 200 and time.monotonic() - started < 30
    log = "".join(plain.lines)
    assert "wrong-token-wrong" not in log and plain.token not in log
    _serving(plain)


def test_slow_and_idle_clients_are_cut_off_at_the_deadline_and_uploads_keep_going(bounded: Target) -> None:
    sha = hashlib.sha256(SMALL).hexdigest()
    head = (
        f"PUT /v1/models/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bounded.token}\r\n"
        f"Content-Length: {len(SMALL)}\r\n\r\n"
    )
    answers: list[bytes] = []

    def trickle() -> None:  # one byte every 0.4 s: each read is quick, the whole body is not
        with _raw(bounded, head, timeout=15) as sock:
            try:
                for byte in SMALL[:40]:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.4)
            except OSError:
                pass
            answers.append(_answer(sock))

    slow = [threading.Thread(target=trickle) for _ in range(2)]
    started = time.monotonic()
    for thread in slow:
        thread.start()
    idle = _raw(bounded, "", timeout=15)  # connects and sends nothing
    half = _raw(bounded, "GET /v1/info HTTP/1.1\r\n", timeout=15)  # headers that never end
    time.sleep(0.3)
    while True:  # a normal upload: busy (503) while the two slow ones read, never for longer than the deadline
        status, answer = _request(bounded, "PUT", f"/v1/models/{sha}", SMALL)
        if status != 503 or time.monotonic() - started > 10:
            break
        time.sleep(0.2)
    assert status == 201 and time.monotonic() - started < 6, (status, answer)
    for thread in slow:
        thread.join(timeout=20)
    assert len(answers) == 2 and all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    for sock in (idle, half):
        assert _answer(sock) == b"" and time.monotonic() - started < 6, "closed once its 2 s were up"
        sock.close()
    _serving(bounded)


def test_a_client_that_goes_away_early_is_one_line_in_the_log(plain: Target) -> None:
    sha = _upload(plain, conv_model(128, 32, in_channels=16, kernel=3))  # a timing of a second or so
    body = json.dumps({"model": sha, "reference": None, "input_shape": [1, 16, 128, 128]})
    before = len(plain.lines)
    sock = _raw(
        plain,
        f"POST /v1/time HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {plain.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}",
    )
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not a polite close
    sock.close()
    deadline = time.monotonic() + 30
    while not any("went away" in line or "Traceback" in line for line in plain.lines[before:]):
        assert time.monotonic() < deadline, plain.lines[before:]
        time.sleep(0.1)
    time.sleep(0.5)
    new = plain.lines[before:]
    assert not any("Traceback" in line for line in new), "".join(new)
    assert len([line for line in new if "went away" in line]) == 1 and len(new) <= 3, "".join(new)
    _serving(plain)


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-token-of-enough-characters-0123456789\n")
    token_file.chmod(mode)
    argv = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file), "--port", "0"]
    process = subprocess.Popen(argv, cwd=ROOT, env=_no_torch_env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the service started with a token file of mode {mode:o}: {out}")
    assert process.returncode == 2
    assert f"chmod 600 {token_file}" in out and f"{mode:04o}" in out and "a-token-of" not in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_the_client_names_the_bound_a_model_goes_over(bounded: Target) -> None:
    from search.errors import UsageError
    from search.latency_service.client import RemoteTimer

    with pytest.raises(UsageError, match=r"422.*--max-timing-s"):
        RemoteTimer(bounded.url, bounded.token).time(conv_model(512, 64, in_channels=64, kernel=3), (1, 64, 512, 512))


def test_oversized_headers_are_refused_in_json(plain: Target) -> None:
    many = "".join(f"X-{i}: {i}\r\n" for i in range(101))
    for head, status in (
        (f"GET /v1/info HTTP/1.1\r\n{many}\r\n", b"431"),
        (f"GET /{'a' * 70000} HTTP/1.1\r\n\r\n", b"414"),
    ):
        with _raw(plain, head, timeout=10) as sock:
            answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"application/json" in answer, answer[:200]
        assert "error" in json.loads(answer.split(b"\r\n\r\n", 1)[1])
    _serving(plain)


def test_each_bad_option_of_the_target_is_named_with_its_value() -> None:
    import argparse

    from search.latency_service.options import argument_problem
    from search.latency_service.service import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert argument_problem(parser.parse_args([])) is None
    problem = argument_problem(parser.parse_args(["--port", "70000", "--max-memory-mb", "100"])) or ""
    assert problem == "--port must be 0..65535, got 70000; --max-memory-mb must be >= 512, got 100", problem

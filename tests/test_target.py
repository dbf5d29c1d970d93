"""The latency target: a real service process (in its own network namespace where the tests can make one),
timed for real, searched through, killed and restarted, and fed every bad input."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest

from search.errors import UsageError
from search.latency_service.client import RemoteTimer
from search.measuring.candidate import LocalTimer
from search.measuring.hardware import fingerprint
from search.measuring.onnx_export import export_onnx
from search.measuring.timing import LatencySettings
from search.models.build import build_model
from search.pruning.channels import apply_policy
from search.pruning.space import SPACES_DIR, load_space
from tests.conftest import ROOT, run_cli

ABSENT_ON_A_BOARD = ("torch", "torchvision", "torch_pruning", "optuna", "rich", "onnx", "sklearn", "matplotlib")
TIMED = re.compile(r" timed .* start=(?P<start>[\d.]+) end=(?P<end>[\d.]+)")


@dataclass
class Target:
    """A ``python -m search.latency_service`` process and everything it printed."""

    url: str
    token_file: Path
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def intervals(self) -> list[tuple[float, float]]:
        return [(float(m["start"]), float(m["end"])) for line in self.lines if (m := TIMED.search(line))]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=20)


def _no_torch_env(tmp: Path) -> dict[str, str]:
    """An environment in which the packages a board lacks cannot be imported."""
    shim = tmp / "absent-packages"
    for name in ABSENT_ON_A_BOARD:
        (shim / name).mkdir(parents=True, exist_ok=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this device')\n")
    return {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}


def _start(argv: list[str], env: dict[str, str], token_file: Path, host: str | None = None) -> Target:
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    match = re.search(r"listening on (https?://\S+?)/ ", first)
    if match is None:
        process.kill()
        raise AssertionError(f"the target did not start: {first}{process.stdout.read()}")
    url = match.group(1)
    if host is not None:  # it listens on 0.0.0.0 inside its namespace; reach it by the namespace's address
        url = f"http://{host}:{urllib.parse.urlsplit(url).port}"
    target = Target(url=url, token_file=token_file, process=process, lines=[first], argv=argv, env=env)

    def follow() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            target.lines.append(line)

    threading.Thread(target=follow, daemon=True).start()
    return target


def _restart(old: Target) -> Target:
    """The same service again, on the same port (a device that rebooted)."""
    port = str(urllib.parse.urlsplit(old.url).port)
    argv = [*old.argv[: old.argv.index("--port") + 1], port, *old.argv[old.argv.index("--port") + 2 :]]
    host = urllib.parse.urlsplit(old.url).hostname
    for _ in range(20):
        try:
            return _start(argv, old.env, old.token_file, host=host if host != "127.0.0.1" else None)
        except AssertionError:
            time.sleep(0.5)  # the port may take a moment to be free again
    raise AssertionError("the target did not restart")


class Namespace:
    """A network namespace with a veth pair: the target on its own host, 10.203.x.2, the tests on 10.203.x.1."""

    def __init__(self) -> None:
        n = os.getpid() % 250 + 1
        self.name, self.here, self.there = f"prune-target-{n}", f"10.203.{n}.1", f"10.203.{n}.2"
        self.veth, self.peer = f"pst{n}a", f"pst{n}b"

    def __enter__(self) -> Namespace:
        self.close()
        for command in (
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", self.peer],
            ["ip", "link", "set", self.peer, "netns", self.name],
            ["ip", "addr", "add", f"{self.here}/30", "dev", self.veth],
            ["ip", "link", "set", self.veth, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.there}/30", "dev", self.peer],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.peer, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=20)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = subprocess.run(["ip", "netns", "add", "prune-target-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return probe.stderr.strip() or "ip netns add failed"
    subprocess.run(["ip", "netns", "del", "prune-target-probe"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The service on its own network host where possible (else on loopback), with no torch importable."""
    tmp = tmp_path_factory.mktemp("target")
    token_file = tmp / "token"
    env = _no_torch_env(tmp)
    service = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file)]
    reason = _netns_unavailable()
    if reason is None:
        with Namespace() as ns:
            argv = ["ip", "netns", "exec", ns.name, *service, "--host", "0.0.0.0", "--port", "8765"]
            started = _start(argv, env, token_file, host=ns.there)
            yield started
            started.stop()
    else:
        print(f"latency target on loopback: no network namespace ({reason})")
        started = _start([*service, "--port", "0"], env, token_file)
        yield started
        started.stop()


def start_loopback_target(tmp_path: Path) -> Target:
    """A ``python -m search.latency_service`` process on loopback (no torch importable), its token in ``tmp_path``."""
    token_file = tmp_path / "token"
    argv = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file), "--port", "0"]
    return _start(argv, _no_torch_env(tmp_path), token_file)


def overlapping(target: Target) -> list[tuple[float, float]]:
    """Timings in the target's log that began before the one before them ended (none, if it queues)."""
    spans = sorted(target.intervals())
    return [later for earlier, later in itertools.pairwise(spans) if later[0] < earlier[1]]


@pytest.fixture()
def local_target(tmp_path: Path) -> Iterator[Target]:
    """A target on loopback of this test's own, to kill and restart."""
    started = start_loopback_target(tmp_path)
    yield started
    started.stop(signal.SIGKILL)


def _request(
    target: Target, method: str, path: str, body: bytes = b"", token: str | None = "", headers: dict | None = None
) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(target.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token or target.token}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    answer = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, answer


def _search_args(studies: Path, weights: Path, target: Target, *extra: str) -> list[str]:
    return [
        "search",
        "--budget-ms",
        "1000",
        "--precision",
        "fp32",
        "--weights",
        str(weights),
        "--input-size",
        "32",
        "--studies-dir",
        str(studies),
        "--study",
        "remote",
        "--finetune-steps",
        "2",
        "--bn-batches",
        "2",
        "--target",
        target.url,
        "--target-token-file",
        str(target.token_file),
        *extra,
    ]


@pytest.fixture(scope="module")
def models(digits32) -> dict[str, bytes]:
    base = build_model("resnet18", digits32.num_classes).eval()
    space = load_space(SPACES_DIR / "resnet18.toml")
    pruned = apply_policy(
        build_model("resnet18", digits32.num_classes), space.uniform(0.5), space, digits32.example_input()
    )
    return {
        "baseline": export_onnx(base, digits32.example_input()),
        "pruned": export_onnx(pruned.model.eval(), digits32.example_input()),
    }


def test_the_service_runs_without_torch_and_reports_this_devices_fingerprint(target: Target) -> None:
    status, info = _request(target, "GET", "/v1/info")
    assert status == 200 and target.process.poll() is None
    assert info["fingerprint"] == fingerprint(1), "the same machine: the same fingerprint as timing here"
    assert oct(target.token_file.stat().st_mode & 0o777) == "0o600"
    assert target.token not in "".join(target.lines), "the token is never printed"
    assert str(target.token_file) in "".join(target.lines), "its path is"


def test_local_and_remote_timings_of_the_same_models_agree(target: Target, models: dict[str, bytes]) -> None:
    shape = (1, 3, 32, 32)
    remote = RemoteTimer(target.url, target.token)
    local = LocalTimer(LatencySettings(threads=1))
    ratios = []
    for _ in range(2):  # side by side, twice, so neither sees a quieter machine
        ratios.append(
            (
                local.time(models["pruned"], shape, reference=models["baseline"]).ratio,
                remote.time(models["pruned"], shape, reference=models["baseline"]).ratio,
            )
        )
    here = sum(r[0] for r in ratios) / 2
    there = sum(r[1] for r in ratios) / 2
    assert here < 0.9 and there < 0.9, "half the channels are measured faster on both"
    assert abs(here - there) / here < 0.1, f"ratios here {here:.3f} and on the target {there:.3f}"


def test_every_bad_request_gets_a_4xx_and_the_service_keeps_serving(
    target: Target, models: dict[str, bytes], tmp_path: Path
) -> None:
    import hashlib

    import onnx

    good = models["pruned"]
    sha = hashlib.sha256(good).hexdigest()
    assert _request(target, "GET", "/v1/info", token=None)[0] == 401
    assert _request(target, "GET", "/v1/info", token="not-the-token-at-all")[0] == 401
    assert _request(target, "PUT", f"/v1/models/{sha}", good, token="wrong-token-wrong")[0] == 401

    garbage = os.urandom(4096)
    status, answer = _request(target, "PUT", f"/v1/models/{hashlib.sha256(garbage).hexdigest()}", garbage)
    assert status == 400 and "ONNX" in answer["error"]
    png = (ROOT / "README.md").read_bytes()  # any file that is not a model
    assert _request(target, "PUT", f"/v1/models/{hashlib.sha256(png).hexdigest()}", png)[0] == 400
    assert _request(target, "PUT", f"/v1/models/{'0' * 64}", good)[0] == 400, "hash does not match"
    assert _request(target, "PUT", "/v1/models/../../etc/passwd", good)[0] == 404

    external = onnx.load_from_string(good)
    onnx.save(external, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    refers = (tmp_path / "m.onnx").read_bytes()
    status, answer = _request(target, "PUT", f"/v1/models/{hashlib.sha256(refers).hexdigest()}", refers)
    assert status == 400 and "external data" in answer["error"]

    status, answer = _request(target, "PUT", f"/v1/models/{sha}", b"", headers={"Content-Length": str(10**12)})
    assert status == 413 and answer["limit"] < 10**12, "refused before reading"

    assert _request(target, "PUT", f"/v1/models/{sha}", good)[0] == 201
    timing = {"model": sha, "reference": None, "input_shape": [1, 3, 64, 64]}
    status, answer = _request(target, "POST", "/v1/time", json.dumps(timing).encode())
    assert status == 400 and "takes input" in answer["error"]
    assert _request(target, "POST", "/v1/time", b"{not json")[0] == 400
    assert _request(target, "POST", "/v1/time", json.dumps({**timing, "path": "/etc"}).encode())[0] == 400
    unknown = json.dumps({"model": "f" * 64, "reference": None, "input_shape": [1, 3, 32, 32]}).encode()
    status, answer = _request(target, "POST", "/v1/time", unknown)
    assert status == 404 and answer["missing"] == ["f" * 64]
    assert _request(target, "GET", "/nothing-here")[0] == 404

    status, answer = _request(
        target, "POST", "/v1/time", json.dumps({**timing, "input_shape": [1, 3, 32, 32]}).encode()
    )
    assert status == 200 and answer["median_ms"] > 0, "still serving"


def test_the_client_names_an_unreachable_target_or_a_wrong_token_in_one_line(
    target: Target, trained_weights: Path, tmp_path: Path
) -> None:
    args = _search_args(tmp_path / "studies", trained_weights, target)
    gone = run_cli(*[a if a != target.url else "http://127.0.0.1:9" for a in args])
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert "error: latency target http://127.0.0.1:9 is unreachable" in gone.stderr
    (tmp_path / "wrong").write_text("not-the-right-token-at-all\n")
    wrong = run_cli(*[a if a != str(target.token_file) else str(tmp_path / "wrong") for a in args])
    assert wrong.returncode == 2 and "refused the token (401)" in wrong.stderr
    assert "not-the-right-token" not in wrong.stderr + wrong.stdout
    assert not (tmp_path / "studies" / "remote.db").exists(), "no study is made before the target is checked"


@pytest.mark.slow
def test_a_search_through_the_target_times_every_candidate_there(
    target: Target, trained_weights: Path, tmp_path: Path
) -> None:
    before = len(target.intervals())
    done = run_cli(*_search_args(tmp_path / "studies", trained_weights, target, "--trials", "3"))
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="remote", storage=f"sqlite:///{tmp_path}/studies/remote.db")
    assert study.user_attrs["latency_measured_on"] == target.url
    _, info = _request(target, "GET", "/v1/info")
    assert study.user_attrs["hardware"] == info["fingerprint"], "the study's fingerprint is the target's"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert all(t.user_attrs["latency"]["measured_on"] == target.url for t in complete)
    assert len(target.intervals()) - before >= 3, "the baseline and the candidates were timed on the target"

    export = run_cli(
        "export", "--study", "remote", "--studies-dir", str(tmp_path / "studies"), "--best", "--epochs", "0"
    )
    assert export.returncode == 2 and f"was timed on the latency target {target.url}" in export.stderr


@pytest.mark.slow
def test_two_clients_sharing_a_target_never_overlap_on_it(
    target: Target, models: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / "a.onnx").write_bytes(models["pruned"])
    (tmp_path / "b.onnx").write_bytes(models["baseline"])
    before = len(target.intervals())
    common = ["--target", target.url, "--target-token-file", str(target.token_file), "--format", "json"]
    runs = [
        subprocess.Popen(
            [sys.executable, "cli.py", "bench", str(tmp_path / name), "--reference", str(tmp_path / ref), *common],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, ref in (("a.onnx", "b.onnx"), ("b.onnx", "a.onnx"), ("a.onnx", "b.onnx"))
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert json.loads(out)["measured_on"] == target.url
    assert len(target.intervals()) - before == 3
    assert not overlapping(target), f"overlapping timings: {sorted(target.intervals())}"


@pytest.mark.slow
def test_a_target_killed_mid_search_is_waited_for_and_a_lost_one_stops_the_run_cleanly(
    local_target: Target, trained_weights: Path, tmp_path: Path
) -> None:
    studies = tmp_path / "studies"
    args = _search_args(studies, trained_weights, local_target, "--trials", "4", "--target-patience", "60")
    search = subprocess.Popen(
        [sys.executable, "cli.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 240
    while len(local_target.intervals()) < 4:  # the study is created and its trials are being timed
        assert time.monotonic() < deadline and search.poll() is None, "the search did not get going"
        time.sleep(0.2)
    local_target.stop(signal.SIGKILL)
    # Back once the search has seen it gone (a fixed pause let a slow fine-tune on a busy machine miss the outage).
    lines: list[str] = []

    def read() -> None:
        for line in search.stdout or []:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not any("unreachable" in line for line in lines) and search.poll() is None:
        assert time.monotonic() < deadline, "the search never noticed the target had gone"
        time.sleep(0.2)
    back = _restart(local_target)
    try:
        search.wait(timeout=300)
        reader.join(timeout=30)
        out = "".join(lines)
    finally:
        back.stop(signal.SIGKILL)
    assert search.returncode == 0, out
    assert f"latency target {local_target.url} unreachable" in out and "answered again after" in out, out
    study = optuna.load_study(study_name="remote", storage=f"sqlite:///{studies}/remote.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and all("latency" in t.user_attrs for t in complete)

    # Lost for good: the run stops cleanly, says why, and the study resumes once a target is back.
    lost = _restart(back)
    args = [*_search_args(studies, trained_weights, lost, "--trials", "6", "--target-patience", "4")]
    search = subprocess.Popen(
        [sys.executable, "cli.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = len(lost.intervals())
    while len(lost.intervals()) == seen:
        assert search.poll() is None, "the search ended before it timed anything"
        time.sleep(0.1)
    lost.stop(signal.SIGKILL)
    out, _ = search.communicate(timeout=300)
    assert search.returncode == 3, out
    assert "Stopped: latency target" in out and "Traceback" not in out
    again = _restart(lost)
    try:
        resumed = run_cli(*_search_args(studies, trained_weights, again, "--trials", "6"))
    finally:
        again.stop(signal.SIGKILL)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    study = optuna.load_study(study_name="remote", storage=f"sqlite:///{studies}/remote.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6, "the trial put back ran once the target was back"
    assert all(t.user_attrs["latency"]["measured_on"] == again.url for t in complete[4:])


def test_the_target_serves_https_with_a_certificate(tmp_path: Path) -> None:
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    token_file = tmp_path / "token"
    argv = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file), "--port", "0",
            "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    served = _start(argv, _no_torch_env(tmp_path), token_file)
    try:
        assert served.url.startswith("https://")
        trusted = RemoteTimer(served.url, served.token, context=ssl.create_default_context(cafile=str(cert)))
        assert trusted.connect()["threads"] == 1
        with pytest.raises(UsageError, match="unreachable"):
            RemoteTimer(served.url, served.token).connect()  # a certificate nobody vouched for
        with pytest.raises(UsageError, match="unreachable"):
            RemoteTimer(served.url.replace("https://", "http://"), served.token).connect()
    finally:
        served.stop()

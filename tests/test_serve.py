"""``cli.py serve``: a tiny study's real exports answer like ONNX Runtime does, refuse bad input, serve under load."""

from __future__ import annotations

import base64
import builtins
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from search.data.spec import DataSpec
from search.serving.app import Limits, create_app
from search.serving.models import ServedModel, load_export
from search.shipping.settings import ExportSettings
from tests.conftest import ROOT, run_main

pytestmark = pytest.mark.slow

IMAGES = 12
"""Test-split digits sent to the server and checked against ONNX Runtime run directly."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, trained_weights: Path) -> dict[str, Path]:
    """A tiny study and two real exports: uniform 0.5 (half the channels, FP32) and the unpruned INT8 trial."""
    import optuna

    from search.shipping.export import export_trial
    from search.shipping.rebuild import load_study_baseline
    from search.study.config import SearchConfig
    from search.study.run import run_search

    root = tmp_path_factory.mktemp("serve")
    weights = root / "baseline.pth"
    shutil.copyfile(trained_weights, weights)
    space = root / "space.toml"  # one uniform recipe: the study is unpruned, uniform 0.5, unpruned int8
    text = (ROOT / "spaces" / "resnet18.toml").read_text()
    space.write_text(re.sub(r"(?m)^uniform_ratios = .*$", "uniform_ratios = [0.5]", text))
    config = SearchConfig(
        budget_ms=1e6,
        weights=str(weights),
        data=DataSpec("digits", input_size=32),
        space=str(space),
        study="tiny",
        trials=3,
        finetune_steps=2,
        bn_batches=2,
        studies_dir=str(root / "studies"),
    )
    run_search(config)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    base = load_study_baseline(study)
    quick = ExportSettings(steps=6, parity_images=64, min_int8_agreement=0.5)
    pruned = next(t.number for t in study.trials if t.user_attrs.get("recipe") == "uniform 0.5 l1")
    paths = {"studies": root / "studies", "pruned": root / "export" / f"trial-{pruned}"}
    export_trial(base, pruned, quick, paths["pruned"], command=f"python cli.py export --trial {pruned}")
    int8 = [t.number for t in study.trials if t.user_attrs.get("recipe") == "unpruned int8"]
    if int8:
        paths["int8"] = root / "export" / f"trial-{int8[0]}"
        export_trial(base, int8[0], replace(quick, steps=None), paths["int8"], command="python cli.py export")
    return paths


@pytest.fixture(scope="module")
def models(exported: dict[str, Path]) -> list[ServedModel]:
    from search.progress import NullReporter
    from search.serving.baseline import baseline_model

    served = [load_export(exported[k], threads=1) for k in ("pruned", "int8") if k in exported]
    url = f"sqlite:///{exported['studies'] / 'tiny'}.db"
    return [*served, baseline_model(served, url, 1, reporter=NullReporter())]


@pytest.fixture(scope="module")
def client(models: list[ServedModel]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(create_app(models, Limits(slots=2))) as c:
        yield c


def _png(pixels: np.ndarray, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _digits(data: Any) -> list[np.ndarray]:
    """The first test-split digits as the data set stores them: 8x8 RGB uint8."""
    return [data.test.images[i].permute(1, 2, 0).numpy() for i in range(IMAGES)]


def _study_baseline(models: list[ServedModel]) -> Any:
    import optuna

    from search.shipping.rebuild import load_study_baseline

    folder = Path(models[0].folder or "")
    url = f"sqlite:///{folder.parent.parent / 'studies' / 'tiny'}.db"
    return load_study_baseline(optuna.load_study(study_name="tiny", storage=url))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _probabilities(answer: dict[str, Any], name: str) -> dict[str, float]:
    model = next(m for m in answer["models"] if m["name"] == name)
    return {t["label"]: t["probability"] for t in model["top"]}


def test_the_card_says_how_to_preprocess_and_the_server_does_exactly_that(models: list[ServedModel], digits32) -> None:
    pruned = models[0]
    record = pruned.card["preprocessing"]
    assert record["classes"] == digits32.classes and record["input_size"] == 32
    assert record["native_size"] == 8 and record["to_input_size"] == "nearest", "digits are 8x8, enlarged sharply"
    assert record["mean"] == list(digits32.mean) and record["std"] == list(digits32.std)
    x, _ = next(digits32.batches("test", IMAGES, shuffle=False, augment=False))
    for i, pixels in enumerate(_digits(digits32)):
        ours = pruned.preprocessing(Image.open(io.BytesIO(_png(pixels))))
        assert np.abs(ours[0] - x[i].numpy()).max() < 1e-5, f"image {i} is not the input training evaluated"


def test_a_real_image_gets_the_top1_onnxruntime_gives(client: Any, models: list[ServedModel], digits32) -> None:
    import torch

    x, _ = next(digits32.batches("test", IMAGES, shuffle=False, augment=False))
    expected = {}
    for model in models:  # each export's file in a session of its own; the baseline in PyTorch
        if model.folder is not None:
            session = ort.InferenceSession(str(Path(model.folder) / model.file))
            expected[model.name] = _softmax(session.run(None, {"input": x.numpy()})[0])
    base = _study_baseline(models)
    with torch.no_grad():
        expected["baseline"] = _softmax(base.model(x).numpy())
    int8 = [m for m in models if m.precision == "int8"]
    assert all(m.file == "model.int8.onnx" for m in int8), "an INT8 card ships, and is served, its INT8 file"
    for i, pixels in enumerate(_digits(digits32)):
        answer = client.post("/predict", files={"image": (f"digit{i}.png", _png(pixels), "image/png")}).json()
        assert answer["k"] == 3 and answer["baseline"] == "baseline"
        for name, p in expected.items():
            got = next(m for m in answer["models"] if m["name"] == name)
            assert got["top"][0]["index"] == int(np.argmax(p[i])), f"{name} on image {i}"
            assert got["top"][0]["label"] == digits32.classes[int(np.argmax(p[i]))]
            assert [t["probability"] for t in got["top"]] == pytest.approx(sorted(p[i])[::-1][:3], abs=1e-4)
            assert got["inference_ms"] > 0
            if name != "baseline":
                base_top = int(np.argmax(expected["baseline"][i]))
                assert got["agrees_with_baseline"] == (int(np.argmax(p[i])) == base_top)
    raw = client.post("/predict?k=10", content=_png(_digits(digits32)[0]), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and all(len(m["top"]) == 10 for m in raw.json()["models"]), "a raw body, k=10"


def _jpeg(pixels: np.ndarray, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _photo(size: tuple[int, int] = (320, 240)) -> np.ndarray:
    """A smooth RGB picture, large enough that cutting its file short leaves it incomplete."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    return np.stack([xx * 255 // size[0], yy * 255 // size[1], (xx + yy) % 256], axis=-1).astype(np.uint8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the server refuses it itself
def test_every_bad_upload_is_a_json_4xx_and_the_server_keeps_serving(client: Any, models: list[ServedModel]) -> None:
    from fastapi.testclient import TestClient

    photo = _jpeg(_photo())
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 megapixels in a few kB
    cases = [
        ({"files": {"image": ("notes.txt", b"just some text, not a picture", "text/plain")}}, 415, "not an image"),
        ({"files": {"image": ("cut.jpg", photo[: len(photo) // 2], "image/jpeg")}}, 422, "truncated or corrupt"),
        ({"files": {"image": ("cut.png", _png(_photo())[:-200], "image/png")}}, 422, "truncated or corrupt"),
        ({"files": {"image": ("empty.png", b"", "image/png")}}, 400, "empty"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            400,
            "the form has no file (fields sent: 'name')",
        ),
        (
            {"files": [("image", ("a.jpg", photo, "image/jpeg")), ("file", ("b.jpg", photo, "image/jpeg"))]},
            400,
            "the form has 2 files (fields sent: 'image', 'file'); send one image per request",
        ),
        ({"data": {"image": "not a file"}}, 415, "not an image"),
        ({"files": {"image": ("bomb.png", bomb.getvalue(), "image/png")}}, 413, "megapixels"),
        (
            {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            400,
            "malformed",
        ),
    ]
    for request, status, words in cases:
        reply = client.post("/predict", **request)
        assert reply.status_code == status and words in reply.json()["error"], (words, reply.text)
    for path, params, status in [("/predict", {"k": 0}, 422), ("/predict", {"k": "three"}, 422)]:
        reply = client.post(path, params=params, files={"image": ("a.jpg", photo, "image/jpeg")})
        assert reply.status_code == status and reply.json()["error"].startswith("bad request parameters: k")
    for path in ("/card.json", "/../card.json", "/%2e%2e/%2e%2e/etc/passwd", "/static/../models.py"):
        reply = client.get(path)
        assert reply.status_code == 404 and "no such path" in reply.json()["error"], path
    assert client.get("/predict").status_code == 405

    # The byte cap, before the body is read: a declared length over it, and a chunked body that passes it.
    small = TestClient(create_app(models, Limits(max_upload_bytes=100_000)))
    big = _png(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    assert len(big) > 100_000
    reply = small.post("/predict", content=big, headers={"content-type": "image/png"})
    assert reply.status_code == 413 and "100000" not in reply.json()["error"] and "0.1 MB" in reply.json()["error"]
    streamed = small.post("/predict", content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]))
    assert streamed.status_code == 413 and "over the limit of 0.1 MB" in streamed.json()["error"]

    assert client.post("/predict", files={"image": ("a.jpg", photo, "image/jpeg")}).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_the_one_file_of_a_form_is_the_image_whatever_its_field(client: Any) -> None:
    """Flask's tutorial and FastAPI's examples post ``file``; a form's single file is taken under any name."""
    photo = _jpeg(_photo())

    def tops(reply: Any) -> list[Any]:
        assert reply.status_code == 200, reply.text
        return [m["top"] for m in reply.json()["models"]]

    want = tops(client.post("/predict", files={"image": ("a.jpg", photo, "image/jpeg")}))
    for field in ("file", "photo", "upload"):
        reply = client.post("/predict", files={field: ("a.jpg", photo, "image/jpeg")}, data={"note": "a cat"})
        assert tops(reply) == want, field


def test_the_per_request_decode_cap_refuses_from_the_header(models: list[ServedModel]) -> None:
    from fastapi.testclient import TestClient

    small = TestClient(create_app(models, Limits(max_decode_bytes=50_000_000, max_decode_total=100_000_000)))
    sixteen = _png(np.zeros((3000, 3000), dtype=np.uint16))  # 9 megapixels, 72 MB decoded and converted
    reply = small.post("/predict", content=sixteen, headers={"content-type": "image/png"})
    assert reply.status_code == 413, reply.text
    assert "3000x3000 in mode I;16: 72 MB decoded, over the limit of 50 MB per request" in reply.json()["error"]
    assert small.post("/predict", content=_png(np.zeros((8, 8), np.uint16))).status_code == 200


def test_other_pixel_formats_are_converted_and_exif_rotation_is_honoured(client: Any, digits32) -> None:
    digit = _digits(digits32)[3]
    gray = digit[..., 0]
    upright = client.post("/predict", files={"image": ("d.png", _png(digit), "image/png")}).json()
    want = _probabilities(upright, "baseline")

    def same_as_upright(data: bytes, mode: str) -> dict[str, Any]:
        answer = client.post("/predict?k=3", files={"image": ("x", data, "application/octet-stream")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["image"]["mode"] == mode
        assert _probabilities(body, "baseline") == pytest.approx(want, abs=1e-5), mode
        return body

    same_as_upright(_png(gray), "L")
    same_as_upright(_png(np.dstack([digit, np.full(gray.shape, 255, np.uint8)])), "RGBA")
    same_as_upright(_png(gray.astype(np.uint16) * 257), "I;16")
    palette = Image.fromarray(digit).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    same_as_upright(buffer.getvalue(), "P")

    # Stored turned a quarter (EXIF orientation 6: "rotate 90 degrees clockwise to display").
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(digit).transpose(Image.Transpose.ROTATE_90)
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    rotated = same_as_upright(buffer.getvalue(), "RGB")
    assert rotated["image"]["exif_rotated"] is True
    exif[0x0112] = 9  # no orientation EXIF defines: nothing is turned, and the answer says so
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG", exif=exif)
    assert same_as_upright(buffer.getvalue(), "RGB")["image"]["exif_rotated"] is False
    unrotated = client.post("/predict", files={"image": ("s.png", _png(np.asarray(stored)), "image/png")}).json()
    assert _probabilities(unrotated, "baseline") != pytest.approx(want, abs=1e-5), "the rotation changes the answer"


def test_no_request_reads_a_file(client: Any, monkeypatch: pytest.MonkeyPatch, digits32) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a request opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    for path in ("/", "/page.js", "/page.css", "/favicon.ico", "/models", "/health", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    reply = client.post("/predict", files={"image": ("d.png", _png(_digits(digits32)[0]), "image/png")})
    assert reply.status_code == 200


def test_older_cards_and_wrong_folders_are_one_line_errors(exported: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(exported["pruned"], old)
    card = json.loads((old / "card.json").read_text())
    del card["preprocessing"]
    (old / "card.json").write_text(json.dumps(card))
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    for args, words in [
        ([str(exported["pruned"]), "--port", port], f"127.0.0.1:{port} is in use; pass another --port"),
        ([str(old)], f"older export; re-export it: python cli.py export --study tiny --trial {card['trial']} --force"),
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(tmp_path)], "has no card.json"),
        ([str(exported["pruned"]), "--weights", "w.pth"], "--storage and --weights go with --baseline"),
        (
            [str(exported["pruned"]), "--baseline", "--studies-dir", str(tmp_path / "elsewhere")],
            "--baseline reads the study the exports name (tiny); pass --studies-dir (or --storage)",
        ),
    ]:
        done = run_main("serve", *args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    taken.close()


@pytest.fixture(scope="module")
def server(exported: dict[str, Path]) -> Iterator[str]:
    """``cli.py serve`` in a process of its own on a free port, with the baseline; its URL."""
    folders = [str(exported[k]) for k in ("pruned", "int8") if k in exported]
    args = ["serve", *folders, "--baseline", "--studies-dir", str(exported["studies"]), "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "cli.py", *args, "--max-upload-mb", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on "):
                break
        assert lines and lines[-1].startswith("serving on http://127.0.0.1:"), "".join(lines)
        assert "1 worker process" in "".join(lines) and "thread(s) per session" in "".join(lines)
        yield lines[-1].split()[2].rstrip("/")
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), "serve stops on SIGTERM (uvicorn re-raises it)"


def test_a_running_server_answers_a_concurrent_load_and_refuses_big_uploads_unread(server: str, digits32) -> None:
    import http.client
    import urllib.request
    from urllib.parse import urlsplit

    image = _png(_digits(digits32)[0])
    script = (
        "import json, sys; from search.serving.load import run_load; "
        f"print(json.dumps(run_load({server!r}, sys.stdin.buffer.read(), content_type='image/png', "
        "clients=8, requests=160)))"
    )
    load = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False
    )
    assert load.stdin is not None
    load.stdin.write(image)
    load.stdin.close()

    # While the load runs: 5 MB declared against a 1 MB limit is refused before the body is sent.
    where = urlsplit(server)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(5_000_000))
    connection.endheaders()
    connection.send(b"\x89PNG" + b"\0" * 60_000)  # a little of it, as a client starts to
    reply = connection.getresponse()
    assert reply.status == 413 and "over the limit of 1.0 MB" in json.loads(reply.read())["error"]
    connection.close()

    assert load.stdout is not None
    result = json.loads(load.stdout.read())
    assert load.wait(timeout=300) == 0
    assert result["statuses"] == {"200": 160} and result["failed"] == 0, result
    assert len(result["distinct_top1"]) == 1, "the same image gets the same answer under load"
    assert result["p50_ms"] > 0 and result["requests_per_second"] > 0
    with urllib.request.urlopen(f"{server}/health", timeout=10) as health:
        about = json.loads(health.read())
    assert about["status"] == "ok" and about["workers"] == 1 and about["slots"] >= 1
    assert about["models"][-1] == "baseline"


def test_the_page_shows_three_classes_for_each_model_in_headless_chromium(
    server: str, exported: dict[str, Path], digits32, tmp_path: Path
) -> None:
    import urllib.error
    import urllib.request

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them as root)")
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1200")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(service=Service(driver), options=options)
    except WebDriverException as exc:
        pytest.skip(f"headless Chromium cannot start here: {str(exc).splitlines()[0]}")
    photo = tmp_path / "digit.png"
    photo.write_bytes(_png(_digits(digits32)[1]))
    shot = tmp_path / "page.png"
    try:
        browser.get(f"{server}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "article.model")) >= 2)
        names = [a.get_attribute("data-model") for a in browser.find_elements(By.CSS_SELECTOR, "article.model")]
        assert names[-1] == "baseline"
        for article in _articles(browser):  # each card's summary beside its answers
            summary = article.find_element(By.CSS_SELECTOR, ".summary").text
            assert all(words in summary for words in ("latency at search", "top-1 (test)", "MACs", "size")), summary
            assert " ms" in summary and "%" in summary and " MB" in summary, summary
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: "digit.png: 8x8 PNG, answered in" in b.find_element(By.ID, "status").text)
        wait.until(lambda b: all(len(a.find_elements(By.CSS_SELECTOR, ".row")) == 3 for a in _articles(b)))
        for article in _articles(browser):
            rows = article.find_elements(By.CSS_SELECTOR, ".row")
            percents = [float(r.find_element(By.CSS_SELECTOR, ".prob").text.rstrip("%")) for r in rows]
            assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
            assert all(r.get_attribute("data-label") in digits32.classes for r in rows)
            assert "ms in ONNX Runtime" in article.text
            if article.get_attribute("data-model") != "baseline":
                assert "the baseline" in article.find_element(By.CSS_SELECTOR, ".agree").text
        preview = browser.find_element(By.ID, "preview")
        assert preview.get_attribute("hidden") is None, "the image is shown"
        assert preview.size["height"] >= 128 and preview.size["width"] >= 128, f"an 8 px image drawn {preview.size}"
        roles = {
            a.get_attribute("data-model"): a.find_element(By.CSS_SELECTOR, ".role").text for a in _articles(browser)
        }
        assert roles["baseline"] == "baseline, fp32" and "pruned, fp32" in roles.values(), roles
        if "int8" in exported:  # the study's unpruned INT8 trial is not called pruned
            assert "unpruned, int8" in roles.values(), roles

        # Dropped on the page instead: a real drop event carrying a file.
        dropped = base64.b64encode(_png(_digits(digits32)[2])).decode()
        browser.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
            "const data = new DataTransfer();"
            "data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
            "const drop = new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true});"
            "document.getElementById('drop').dispatchEvent(drop);",
            dropped,
        )
        wait.until(lambda b: "dropped.png: 8x8 PNG, answered in" in b.find_element(By.ID, "status").text)
        assert all(len(a.find_elements(By.CSS_SELECTOR, ".row")) == 3 for a in _articles(browser))

        # A failed upload: its error, its preview, and none of the previous image's answers beside them.
        notes = tmp_path / "notes.png"
        notes.write_bytes(b"just some text, not a picture")
        browser.find_element(By.ID, "file").send_keys(str(notes))
        wait.until(lambda b: "not an image" in b.find_element(By.ID, "status").text)
        for article in _articles(browser):
            assert not article.find_elements(By.CSS_SELECTOR, ".row"), "the last image's answers are gone"
            assert "No answer for this image." in article.text

        # Offline and complete: a favicon, nothing fetched from elsewhere, no /docs that needs a CDN.
        problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # a 404 by its status, not by the port number in the URL (port 40477 once failed this)
        assert not [p for p in problems if "favicon" in p or "status of 404" in p], problems
        assert "http" not in browser.page_source.replace(server, ""), "the page refers to nothing outside"
        for path in ("/docs", "/redoc"):
            try:
                urllib.request.urlopen(f"{server}{path}", timeout=10)
                raise AssertionError(f"{path} is served, and would load its scripts from a CDN")
            except urllib.error.HTTPError as exc:
                assert exc.code == 404 and "no such path" in json.loads(exc.read())["error"]
    except (AssertionError, TimeoutException):
        browser.save_screenshot(str(shot))
        print(f"screenshot of the page: {shot}")
        raise
    finally:
        browser.quit()


def _articles(browser: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "article.model")


def test_a_fuzz_of_the_api_from_its_own_schema_finds_no_server_error(models: list[ServedModel]) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(models, Limits(slots=2)))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {"GET /health", "GET /models", "POST /predict"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    started = time.monotonic()
    for operation in operations:

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            case.call_and_validate(checks=checks)

        fuzz()
    assert time.monotonic() - started < 120, "the fuzz is bounded"


@pytest.mark.parametrize("size", [48, 128])
def test_photos_are_preprocessed_as_the_image_folder_evaluates_them(tmp_path: Path, size: int) -> None:
    """JPEG photos of other sizes, in both regimes (48 px: whole image; 128 px: stored larger, centre crop)."""
    from search.data.loading import load_dataset
    from search.serving.images import decode_image
    from search.serving.preprocess import Preprocessing
    from search.shipping.preprocessing import preprocessing_record

    rng = np.random.default_rng(size)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i, shape in enumerate([(300, 200), (180, 260), (640, 480)]):
                noise = rng.integers(0, 60, (shape[1], shape[0], 3), dtype=np.uint8)
                (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(shape) // 2 + noise))
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=size))
    pre = Preprocessing.from_card({"preprocessing": preprocessing_record(data)})
    assert pre.crop == ("resized" if size >= 128 else "pad") and pre.native_size == data.train.images.shape[-1]
    x, _ = next(data.batches("val", 6, shuffle=False, augment=False))
    files = sorted((tmp_path / "val").glob("*/*.jpg"))
    for i, path in enumerate(files):
        image = decode_image(path.read_bytes(), max_pixels=10**7, draft_size=pre.native_size).image
        assert np.abs(pre(image)[0] - x[i].numpy()).max() < 1e-4, f"{path.name} at {size} px"

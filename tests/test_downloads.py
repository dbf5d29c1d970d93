"""``--weights imagenet`` and plain ``--data cifar10`` download what is missing, as torchvision would.

Nothing here reaches the internet: the URLs are pointed at a loopback port that refuses
connections (offline) or at a small HTTP server on 127.0.0.1 of this test (the download itself,
with torchvision's own hash checks), and the cached paths are filled by hand.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.datasets import CIFAR10

from search.data.cache import DECODED_CACHE_ENV
from search.data.loading import load_dataset
from search.data.spec import DataSpec
from search.errors import UsageError
from search.models.build import build_model
from search.models.weights import load_weights
from search.progress import RecordingReporter

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value


def _refused_url(name: str) -> str:
    """A loopback URL nobody listens on: the connection is refused at once, as offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[object]:
    """``serve(name, data)``: a URL on a loopback HTTP server (this test's thread) that answers with ``data``."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def put(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield put
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache of this test (``torch.hub.get_dir()`` follows ``TORCH_HOME``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _state_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.save(build_model("resnet18", 1000).state_dict(), buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- --weights imagenet


def test_imagenet_weights_offline_is_one_line_naming_the_url_and_the_file(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _refused_url("resnet18-f37072fd.pth")
    monkeypatch.setattr(WEIGHTS, "url", url)
    with pytest.raises(UsageError) as err:
        load_weights(build_model("resnet18", 1000), "imagenet", model_name="resnet18")
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot download {url}" in message and str(hub / "resnet18-f37072fd.pth") in message
    assert "pass --weights PATH" in message
    assert not hub.exists() or not list(hub.iterdir())  # no partial file left behind


def test_imagenet_weights_in_the_hub_cache_are_used_without_a_download(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WEIGHTS, "url", _refused_url("resnet18-f37072fd.pth"))  # a download would fail
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(_state_bytes())
    model = build_model("resnet18", 1000)
    loaded = load_weights(model, "imagenet", model_name="resnet18")
    assert loaded.kind == "imagenet" and loaded.sha256 == hashlib.sha256(_state_bytes()).hexdigest()
    torch.manual_seed(0)
    assert torch.equal(model.conv1.weight, build_model("resnet18", 1000).conv1.weight)


def test_missing_imagenet_weights_are_downloaded_into_the_hub_cache_with_their_hash_checked(
    hub: Path, monkeypatch: pytest.MonkeyPatch, serve: object
) -> None:
    data = _state_bytes()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torchvision's naming: the hash prefix
    monkeypatch.setattr(WEIGHTS, "url", serve(name, data))  # type: ignore[operator]
    reporter = RecordingReporter()
    model = build_model("resnet18", 1000)
    load_weights(model, "imagenet", model_name="resnet18", reporter=reporter)
    assert (hub / name).read_bytes() == data
    assert any("downloading torchvision's ImageNet weights for resnet18" in line for line in reporter.infos)
    torch.manual_seed(0)
    assert torch.equal(model.fc.weight, build_model("resnet18", 1000).fc.weight)


def test_a_download_that_does_not_match_its_hash_is_refused_in_one_line(
    hub: Path, monkeypatch: pytest.MonkeyPatch, serve: object
) -> None:
    url = serve("resnet18-00000000.pth", _state_bytes())  # type: ignore[operator]
    monkeypatch.setattr(WEIGHTS, "url", url)
    with pytest.raises(UsageError) as err:
        load_weights(build_model("resnet18", 1000), "imagenet", model_name="resnet18")
    message = str(err.value)
    assert "\n" not in message and url in message and "does not match the hash" in message
    assert str(hub / "resnet18-00000000.pth") in message
    assert not (hub / "resnet18-00000000.pth").exists()


# --------------------------------------------------------------------------- --data cifar10


def _cifar_files(folder: Path, per_batch: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [0, 1] * (per_batch // 2),
        }
        (folder / name).write_bytes(pickle.dumps(content))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}))


@pytest.fixture()
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(DECODED_CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_plain_cifar10_uses_the_copy_in_the_cache_folder(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CIFAR10, "url", _refused_url("cifar-10-python.tar.gz"))  # a download would fail
    _cifar_files(cache_root / "cifar10" / "cifar-10-batches-py")
    data = load_dataset(DataSpec("cifar10"))
    assert data.classes == ["cat", "dog"] and len(data.test) == 10


def test_plain_cifar10_offline_is_one_line_naming_the_url_and_the_folder(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _refused_url("cifar-10-python.tar.gz")
    monkeypatch.setattr(CIFAR10, "url", url)
    with pytest.raises(UsageError) as err:
        load_dataset(DataSpec("cifar10"))
    message = str(err.value)
    assert "\n" not in message and f"cannot download CIFAR-10 from {url}" in message
    assert f"into {cache_root / 'cifar10'}" in message and "--data cifar10:PATH" in message


def _archive() -> bytes:
    staging = io.BytesIO()
    with tarfile.open(fileobj=staging, mode="w:gz") as tar:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            _cifar_files(Path(folder) / "cifar-10-batches-py")
            tar.add(Path(folder) / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return staging.getvalue()


def test_plain_cifar10_downloads_checks_the_md5_and_extracts_into_the_cache_folder(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch, serve: object
) -> None:
    archive = _archive()
    monkeypatch.setattr(CIFAR10, "url", serve("cifar-10-python.tar.gz", archive))  # type: ignore[operator]
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive).hexdigest())
    reporter = RecordingReporter()
    data = load_dataset(DataSpec("cifar10"), reporter)
    assert data.classes == ["cat", "dog"]
    assert (cache_root / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (cache_root / "cifar10" / "cifar-10-python.tar.gz").exists()  # extracted, then removed
    assert any("downloading" in line for line in reporter.infos)


def test_a_cifar10_archive_that_does_not_match_its_md5_is_refused_in_one_line(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch, serve: object
) -> None:
    url = serve("cifar-10-python.tar.gz", _archive())  # type: ignore[operator]
    monkeypatch.setattr(CIFAR10, "url", url)
    with pytest.raises(UsageError) as err:
        load_dataset(DataSpec("cifar10"))
    message = str(err.value)
    assert "\n" not in message and "does not match its MD5" in message and url in message
    assert not (cache_root / "cifar10" / "cifar-10-python.tar.gz").exists()

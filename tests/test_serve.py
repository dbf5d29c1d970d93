"""``cli.py serve``: a tiny study's real exports answer like ONNX Runtime does, refuse bad input, serve under load."""

from __future__ import annotations

import io
import shutil
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

pytestmark = pytest.mark.slow

IMAGES = 12
"""Test-split digits sent to the server and checked against ONNX Runtime run directly."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, trained_weights: Path) -> dict[str, Path]:
    """A tiny study and two real exports: trial 3 (half the channels, FP32) and the unpruned INT8 trial."""
    import optuna

    from search.shipping.export import export_trial
    from search.shipping.rebuild import load_study_baseline
    from search.study.config import SearchConfig
    from search.study.run import run_search

    root = tmp_path_factory.mktemp("serve")
    weights = root / "baseline.pth"
    shutil.copyfile(trained_weights, weights)
    config = SearchConfig(
        budget_ms=1e6,
        weights=str(weights),
        data=DataSpec("digits", input_size=32),
        study="tiny",
        trials=5,
        finetune_steps=2,
        bn_batches=2,
        studies_dir=str(root / "studies"),
    )
    run_search(config)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    base = load_study_baseline(study)
    quick = ExportSettings(steps=6, parity_images=64, min_int8_agreement=0.5)
    paths = {"studies": root / "studies", "pruned": root / "export" / "trial-3"}
    export_trial(base, 3, quick, paths["pruned"], command="python cli.py export --trial 3")
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

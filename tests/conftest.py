"""Shared fixtures: tiny but real settings (real ResNet-18 shapes, real ONNX Runtime, real SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def digits32():
    """The built-in digits data at 32x32: real images, tiny compute."""
    from search.data import DataSpec, load_dataset

    return load_dataset(DataSpec("digits", input_size=32))


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory: pytest.TempPathFactory, digits32) -> Path:
    """A resnet18 state_dict trained briefly on digits at 32x32, as a user would bring it."""
    import torch

    from search.finetune import TrainSettings, train
    from search.models import build_model

    model = build_model("resnet18", digits32.num_classes)
    train(model, digits32, TrainSettings(steps=40, batch_size=32, lr=0.05))
    path = tmp_path_factory.mktemp("weights") / "resnet18_digits32.pth"
    torch.save(model.state_dict(), path)
    return path

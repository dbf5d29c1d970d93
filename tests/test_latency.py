"""Real ONNX Runtime timing: exported models agree with PyTorch, and removing channels is measured."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from search.measuring.onnx_export import export_onnx
from search.measuring.timing import LatencySettings, measure, open_session
from search.pruning.channels import apply_policy
from search.pruning.space import load_space

X = torch.randn(1, 3, 96, 96)
FAST = LatencySettings(threads=1, warmup=3, round_size=5, min_rounds=2, max_seconds=5)


def test_exported_onnx_matches_pytorch() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    session = open_session(export_onnx(model, X), threads=1)
    got = session.run(None, {"input": X.numpy()})[0]
    with torch.no_grad():
        expected = model(X).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_dynamic_batch_export_accepts_other_batch_sizes() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    session = open_session(export_onnx(model, X, dynamic_batch=True), threads=1)
    assert session.run(None, {"input": np.zeros((3, 3, 96, 96), np.float32)})[0].shape == (3, 10)


def test_measurement_reports_median_p90_and_an_interleaved_ratio() -> None:
    space = load_space("spaces/resnet18.toml")
    base = torchvision.models.resnet18(num_classes=10).eval()
    pruned = apply_policy(torchvision.models.resnet18(num_classes=10), space.uniform(0.7), space, X).model
    reference = export_onnx(base, X)
    result = measure(export_onnx(pruned, X), tuple(X.shape), FAST, reference=reference)
    assert 0 < result.median_ms <= result.p90_ms
    assert result.runs >= FAST.round_size * FAST.min_rounds
    assert result.reference_median_ms is not None and result.ratio is not None
    # Removing 70% of the channels removes ~90% of the MACs: it must time clearly faster.
    assert result.ratio < 0.6

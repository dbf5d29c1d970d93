"""Quantization-aware training: the fake-quantized PyTorch model computes what ONNX Runtime's INT8 model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from search.measuring.onnx_export import export_onnx
from search.measuring.quantize import QuantizeSettings, calibration_batches, quantize_onnx
from search.models.build import build_model
from search.shipping.qat import fake_quant_agreement
from search.training.fake_quant import (
    calibrate,
    copy_back,
    fake_quant_modules,
    follow_ranges,
    freeze,
    prepare_qat,
    shared_names,
)
from search.training.finetune import TrainSettings, train


def _qat_resnet(digits32, trained_weights: Path, reduce_range: bool, steps: int = 4):
    model = build_model("resnet18", digits32.num_classes)
    model.load_state_dict(torch.load(trained_weights, weights_only=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize = QuantizeSettings(calibration_images=64, reduce_range=reduce_range)
    calibration = calibration_batches(digits32, quantize)
    prepared = prepare_qat(model, digits32.example_input(), reduce_range=reduce_range)
    names = shared_names(prepared, model)
    calibrate(prepared, calibration)
    freeze(prepared, batchnorm=True, observers=False)
    follow_ranges(prepared)
    train(prepared, digits32, TrainSettings(steps=steps, batch_size=32, lr=0.001, train_dtype="fp32"))
    copy_back(prepared, model, names)
    calibrate(prepared, calibration)
    return model, prepared, quantize, calibration, before


def test_the_int8_model_predicts_what_the_fake_quantized_model_trained_as(digits32, trained_weights: Path) -> None:
    model, prepared, quantize, calibration, before = _qat_resnet(digits32, trained_weights, reduce_range=False)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.endswith("conv1.weight") for k in changed), "the QAT steps trained the FP32 model's own weights"
    assert not any(k.endswith("running_mean") for k in changed), "BatchNorm statistics are frozen during QAT"
    int8 = quantize_onnx(export_onnx(model, digits32.example_input(), dynamic_batch=True), calibration, quantize)
    measured = fake_quant_agreement(prepared, int8, digits32, "test", None, threads=1)
    assert measured["images"] == len(digits32.test)
    assert measured["agreement_with_fake_quant"] >= 0.99, measured
    assert abs(measured["int8_top1"] - measured["fake_quant_top1"]) <= 0.01


def test_fake_quantization_uses_onnxruntimes_ranges(digits32, trained_weights: Path) -> None:
    """The same activation scales as ONNX Runtime's calibration, and 7-bit weights where reduce_range says so."""
    model, prepared, quantize, calibration, _ = _qat_resnet(digits32, trained_weights, reduce_range=True, steps=1)
    int8 = onnx.load_from_string(
        quantize_onnx(export_onnx(model, digits32.example_input(), dynamic_batch=True), calibration, quantize)
    )
    values = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    ort_scales = sorted(float(values[n.input[1]]) for n in int8.graph.node if n.op_type == "QuantizeLinear")
    torch_scales = sorted(float(m.scale) for _, m in fake_quant_modules(prepared, weights=False))
    assert len(torch_scales) >= 0.8 * len(set(ort_scales))
    for scale in torch_scales:  # every tensor the fake-quantized model rounds, ONNX Runtime rounds alike
        assert min(abs(scale - s) / s for s in ort_scales) < 1e-4, scale
    weights = [m for _, m in fake_quant_modules(prepared, weights=True)]
    assert {(m.quant_min, m.quant_max) for m in weights} == {(-64, 64)}
    int8_weights = [values.get(n.input[0]) for n in int8.graph.node if n.op_type == "DequantizeLinear"]
    int8_weights = [w for w in int8_weights if w is not None and w.dtype == np.int8 and w.ndim >= 2]
    assert int8_weights and max(int(np.abs(w).max()) for w in int8_weights) == 64


def test_a_relu6_is_quantized_as_onnxruntime_folds_its_clip(digits32) -> None:
    """MobileNetV2's Conv-BN-ReLU6: ONNX Runtime drops the Clip and quantizes the convolution with its range."""
    from torchvision.ops.misc import Conv2dNormActivation

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Conv2dNormActivation(3, 16, activation_layer=torch.nn.ReLU6),
        Conv2dNormActivation(16, 16, groups=16, activation_layer=torch.nn.ReLU6),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    with torch.no_grad():
        model[0][0].weight.mul_(8)  # outputs well past 6, so the cap matters
    quantize = QuantizeSettings(calibration_images=64, reduce_range=False)
    calibration = calibration_batches(digits32, quantize)
    prepared = prepare_qat(model, digits32.example_input(), reduce_range=False)
    calibrate(prepared, calibration)
    assert type(model[0][2]) is torch.nn.ReLU6, "the model itself keeps its ReLU6"
    int8 = onnx.load_from_string(
        quantize_onnx(export_onnx(model, digits32.example_input(), dynamic_batch=True), calibration, quantize)
    )
    values = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    ort_scales = sorted(float(values[n.input[1]]) for n in int8.graph.node if n.op_type == "QuantizeLinear")
    torch_scales = sorted(float(m.scale) for _, m in fake_quant_modules(prepared, weights=False))
    assert any(abs(s - 6 / 255) < 1e-6 for s in torch_scales), "the first block's range is [0, 6]"
    capped = [m for _, m in fake_quant_modules(prepared, weights=False) if getattr(m, "cap", None) == 6.0]
    assert len(capped) == 2, "both Conv-BN-ReLU6 outputs are capped"
    assert sum(abs(s - 6 / 255) < 1e-6 for s in ort_scales) == 2, "ONNX Runtime quantizes both with the Clip's range"
    for scale in torch_scales:  # pooled features included: global average pooling has its own range
        assert min(abs(scale - s) / s for s in ort_scales) < 1e-4, (scale, ort_scales)
    x = np.concatenate(calibration)[:64]
    with torch.no_grad():
        expected = prepared(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(int8.SerializeToString()).run(None, {"input": x})[0]
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max(), "the same logits, to a rounding step"

"""Fake quantization that matches how ONNX Runtime runs an INT8 model (quantization-aware training).

:mod:`search.measuring.quantize` makes INT8 models with ONNX Runtime's static quantizer: QDQ,
per-channel symmetric INT8 weights (7 bits, ``[-64, 64]``, where the CPU needs ``reduce_range``;
else ``[-127, 127]``), UINT8 asymmetric activations (``[0, 255]``, never reduced), ranges by min/max
over the calibration images, BatchNorm folded into the convolution before quantizing. This module
prepares a PyTorch model that computes the same thing in float (torch.ao FX quantization-aware
training): Conv+BatchNorm(+ReLU) fused with BatchNorm folding simulated, weights fake-quantized per
output channel with the same integer range, activations fake-quantized per tensor where ONNX
Runtime's QDQ quantizer puts them: torch.ao's x86 places (model input, convolution and linear
outputs, additions, pooling), with a ReLU6 after a convolution folded into its range (ONNX Runtime
drops the Clip) and global average pooling given its own range (ONNX Runtime calibrates it).

Scales are observed, not learned. During training, activation ranges follow a moving average and
weight scales the current weights; at the end :func:`calibrate` sets every activation range to the
min/max of the FP32 model over the calibration images, exactly what ONNX Runtime's MinMax
calibrator computes, so the fake-quantized model and the shipped INT8 model use the same ranges.
(Per-channel symmetric weight scales commute with BatchNorm folding, so quantizing the unfolded
weight, as here, rounds the same as quantizing the folded one, as ONNX Runtime does.)
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

__all__ = [
    "calibrate",
    "copy_back",
    "fake_quant_modules",
    "follow_ranges",
    "freeze",
    "prepare_qat",
    "shared_names",
    "weight_range",
]


def weight_range(reduce_range: bool) -> tuple[int, int]:
    """The integer range of ONNX Runtime's symmetric INT8 weights (``reduce_range``: 7 bits)."""
    return (-64, 64) if reduce_range else (-127, 127)


def _capped_fake_quantize():
    from torch.ao.quantization import FakeQuantize

    class CappedFakeQuantize(FakeQuantize):
        """Fake quantization of values clipped at ``cap`` first: a ReLU6 folded into the fake quantization
        after the convolution it follows, as ONNX Runtime removes a Clip after a convolution and
        quantizes the convolution's output with the Clip's range (calibration sees clipped values too)."""

        cap = math.inf

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.clamp(max=self.cap) if self.cap < math.inf else x)

    return CappedFakeQuantize


def _qconfig(reduce_range: bool):
    from torch.ao.quantization import FakeQuantize, QConfig
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    low, high = weight_range(reduce_range)
    activation = _capped_fake_quantize().with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        reduce_range=False,
    )
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=1.0,  # the current weights' range, as ONNX Runtime takes it from the final ones
        quant_min=low,
        quant_max=high,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return QConfig(activation=activation, weight=weight)


def _backend_config():
    """torch.ao's x86 (fbgemm) patterns, except that global average pooling has its own output range, as in
    ONNX Runtime (which quantizes GlobalAveragePool's output with the range calibrated on it)."""
    import torch.nn.functional as F
    from torch.ao.quantization.backend_config import BackendConfig, ObservationType, get_fbgemm_backend_config

    own_range = {nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, torch.mean}
    configs = []
    for config in get_fbgemm_backend_config().configs:
        if config.pattern in own_range:
            config.set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
        configs.append(config)
    return BackendConfig("onnxruntime_qdq").set_backend_pattern_configs(configs)


def prepare_qat(model: nn.Module, example_input: torch.Tensor, *, reduce_range: bool) -> torch.fx.GraphModule:
    """A fake-quantized ``model`` in train mode, on the CPU, sharing its parameters (:func:`copy_back` after training).

    Raises ValueError when the model cannot be traced symbolically (torch.fx) or nothing in it is quantized.
    """
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = QConfigMapping().set_global(_qconfig(reduce_range))
    model.cpu().train()
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    copied = copy.deepcopy(model, shared)  # the same parameters and buffers, in modules that may be swapped
    capped = _relu6_as_relu(copied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's FX flow is deprecated in favour of PT2E, still supported
        try:
            prepared = prepare_qat_fx(copied, mapping, (example_input.cpu(),), backend_config=_backend_config())
        except Exception as exc:  # torch.fx cannot trace data-dependent control flow
            why = f"the model cannot be prepared for fake quantization ({type(exc).__name__}: {exc})"
            raise ValueError(why.splitlines()[0]) from exc
    if not any(True for _ in fake_quant_modules(prepared, weights=True)):
        raise ValueError("nothing in the model was prepared for fake quantization (no Conv2d or Linear found)")
    for node in prepared.graph.nodes:  # the ReLU6 swapped for a ReLU (fused) caps the range after it at 6
        if node.op == "call_module" and node.target in capped:
            for user in node.users:
                after = prepared.get_submodule(user.target) if user.op == "call_module" else None
                if after is not None and hasattr(after, "cap"):
                    after.cap = 6.0
    return prepared


def _relu6_as_relu(model: nn.Module) -> set[str]:
    """Swap each ReLU6 that follows a Conv2d (and BatchNorm) in a Sequential for a ReLU, which torch.ao fuses
    with them; returns the convolutions' names, whose output range is then capped at 6 (see CappedFakeQuantize)."""
    capped = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Sequential):
            continue
        kids = list(module.named_children())
        for i, (kid_name, kid) in enumerate(kids):
            if type(kid) is not nn.ReLU6:
                continue
            conv = i - 2 if i >= 2 and isinstance(kids[i - 1][1], nn.BatchNorm2d) else i - 1
            if conv >= 0 and type(kids[conv][1]) is nn.Conv2d:
                setattr(module, kid_name, nn.ReLU())
                capped.add(f"{name}.{kids[conv][0]}" if name else kids[conv][0])
    return capped


def fake_quant_modules(model: nn.Module, *, weights: bool | None = None) -> Iterable[tuple[str, nn.Module]]:
    """The FakeQuantize modules of a prepared model (``weights``: only weights' or only activations')."""
    from torch.ao.quantization import FakeQuantize

    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            is_weight = name.endswith("weight_fake_quant")
            if weights is None or weights == is_weight:
                yield name, module


def freeze(model: nn.Module, *, batchnorm: bool = True, observers: bool = True) -> None:
    """Stop updating BatchNorm statistics (the folded weights then stay fixed) and/or activation ranges."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    if batchnorm:
        model.apply(freeze_bn_stats)
    if observers:
        for _, module in fake_quant_modules(model, weights=False):
            module.disable_observer()


def follow_ranges(model: nn.Module, averaging: float = 0.01) -> None:
    """Let activation ranges follow a moving average of what training batches produce (from where they are)."""
    for _, module in fake_quant_modules(model, weights=False):
        module.activation_post_process.averaging_constant = averaging
        module.enable_observer()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[np.ndarray]) -> None:
    """Activation ranges: the min/max of the float model over ``batches`` (ONNX Runtime's MinMax calibration).

    The model runs unquantized (fake quantization off, BatchNorm statistics frozen, eval mode)
    while the observers, reset first, record every tensor's range; then fake quantization is
    switched back on with the observers frozen, and the model is left in eval mode.
    """
    activations = [m for _, m in fake_quant_modules(model, weights=False)]
    weights = [m for _, m in fake_quant_modules(model, weights=True)]
    model.eval()
    for module in activations:
        module.activation_post_process.reset_min_max_vals()
        module.activation_post_process.averaging_constant = 1.0  # replaced below by a running min/max
        module.enable_observer()
        module.disable_fake_quant()
    for module in weights:
        module.disable_fake_quant()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for batch in batches:
        model(torch.from_numpy(np.ascontiguousarray(batch)))
        for i, module in enumerate(activations):  # the overall min/max, not the last batch's
            obs = module.activation_post_process
            low, high = seen.get(i, (obs.min_val, obs.max_val))
            seen[i] = (torch.minimum(low, obs.min_val), torch.maximum(high, obs.max_val))
    for i, module in enumerate(activations):
        obs = module.activation_post_process
        if i in seen:
            obs.min_val.copy_(seen[i][0])
            obs.max_val.copy_(seen[i][1])
        scale, zero_point = obs.calculate_qparams()
        module.scale.resize_(scale.shape).copy_(scale)
        module.zero_point.resize_(zero_point.shape).copy_(zero_point)
        module.disable_observer()
        module.enable_fake_quant()
    for module in weights:
        module.enable_observer()  # weight scales follow the weights (a forward pass computes them)
        module.enable_fake_quant()
    model.eval()


def shared_names(prepared: nn.Module, model: nn.Module) -> dict[str, str]:
    """For each parameter and buffer of ``prepared`` that is ``model``'s: its name there (call before training)."""
    originals = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    return {name: originals[id(t)] for name, t in prepared.state_dict(keep_vars=True).items() if id(t) in originals}


@torch.no_grad()
def copy_back(prepared: nn.Module, model: nn.Module, names: dict[str, str]) -> None:
    """Write the trained parameters and BatchNorm statistics of ``prepared`` into ``model`` (``names``:
    :func:`shared_names`)."""
    source = prepared.state_dict()
    target = model.state_dict(keep_vars=True)
    for prepared_name, name in names.items():
        target[name].copy_(source[prepared_name].to(target[name].device))

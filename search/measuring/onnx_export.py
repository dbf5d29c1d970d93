"""PyTorch models to ONNX, and the small graph edits timing and quantization need.

Every ONNX model the tool makes comes from :func:`export_onnx` (opset 17, input ``input``,
output ``logits``), so the search, export and INT8 quantization see the same graph.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

__all__ = ["export_onnx", "fix_batch", "fixed_batch"]


def export_onnx(model: nn.Module, example_input: torch.Tensor, *, dynamic_batch: bool = False) -> bytes:
    """The model as an ONNX file's bytes (opset 17, input ``input``, output ``logits``)."""
    model = model.eval()
    buffer = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_input,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def fix_batch(onnx_model: bytes, batch: int = 1) -> bytes:
    """The model with its symbolic batch dimension fixed to ``batch`` (a dynamic export, timed like a static one)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load_from_string(onnx_model)
    dims = {
        d.dim_param
        for v in model.graph.input
        for d in v.type.tensor_type.shape.dim[:1]
        if d.HasField("dim_param") and d.dim_param
    }
    for name in dims:
        make_dim_param_fixed(model.graph, name, batch)
    return model.SerializeToString()


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The input's batch size if it is a fixed number, None if it is symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None

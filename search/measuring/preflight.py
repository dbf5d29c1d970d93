"""Before a study is created: can this model be pruned, exported to ONNX and run as the search will?

A model torch-pruning cannot trace, one whose pruned form ONNX cannot express, or one ONNX
Runtime computes differently is refused here with a one-line reason and what to change, before
a baseline is trained or a study stored. The check prunes a fresh copy of the model (its
weights do not matter) with the space's most-pruned policy, exports it and the unpruned model,
and runs both in ONNX Runtime against PyTorch. It takes a few seconds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from search.errors import UsageError
from search.measuring.onnx_export import export_onnx
from search.pruning.channels import apply_policy
from search.pruning.space import SearchSpace

__all__ = ["check_searchable"]

MAX_REL_DIFF = 1e-3
"""ONNX Runtime's logits may differ from PyTorch's by this fraction of their scale (float rounding)."""


def check_searchable(name: str, model: nn.Module, space: SearchSpace, example_input: torch.Tensor) -> None:
    """Raise :class:`UsageError` when ``model`` (named ``name``) cannot go through a trial."""
    model = copy.deepcopy(model).eval()
    size = "x".join(str(s) for s in example_input.shape[1:])
    _run_in_onnxruntime(name, "the unpruned model", model, example_input, size)
    fastest = space.fastest_policies()[0]  # the shapes, with a criterion that needs no gradients
    policy = replace(fastest, stages={k: replace(v, criterion="random") for k, v in fastest.stages.items()})
    try:
        with torch.enable_grad():  # torch-pruning traces the graph through autograd
            apply_policy(model, policy, space, example_input)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(
            f"model {name} cannot be searched: torch-pruning cannot remove its channels "
            f"({_reason(error)}); use a model without that construct, or a space (--space) whose stages "
            "leave the modules around it unpruned"
        ) from error
    _run_in_onnxruntime(name, "its most pruned form", model, example_input, size)


def _run_in_onnxruntime(name: str, what: str, model: nn.Module, example: torch.Tensor, size: str) -> None:
    try:
        with _quiet_output():  # the exporter prints its whole graph on failure
            onnx_model = export_onnx(model, example)
        session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    except Exception as error:
        hint = " or --input-size 224 (its native size)" if example.shape[-1] != 224 else ""
        raise UsageError(
            f"model {name} cannot be searched at input {size}: {what} does not export to ONNX or run in "
            f"ONNX Runtime ({_reason(error)}); change the model{hint}"
        ) from error
    with torch.no_grad():
        want = model(example).numpy()
    scale = float(np.abs(want).max()) or 1.0
    worst = float(np.abs(got - want).max())
    if worst > MAX_REL_DIFF * scale:
        raise UsageError(
            f"model {name}: ONNX Runtime computes {what} differently from PyTorch (largest logit difference "
            f"{worst:.3g}, {worst / scale:.1e} of their scale); its latency would be measured on another model"
        )


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 (where the exporter's C++ code logs) to a scratch file for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _reason(error: BaseException) -> str:
    """The error's first line, without the graph dumps some exporters append."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    for tail in (" Please feel free", " [Caused by"):
        first = first.split(tail)[0]
    return f"{type(error).__name__}: {first[:300].rstrip()}"

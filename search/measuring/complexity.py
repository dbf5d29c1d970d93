"""MACs and parameter counts (ptflops). Labelled as counts, never used as latency."""

from __future__ import annotations

import contextlib
import io
import warnings

from ptflops import get_model_complexity_info
from torch import nn

__all__ = ["macs_and_params"]


def macs_and_params(model: nn.Module, input_size: int) -> tuple[int, int]:
    """Multiply-accumulates for one ``input_size``² image, and the number of parameters."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        macs, params = get_model_complexity_info(
            model,
            (3, input_size, input_size),
            as_strings=False,
            print_per_layer_stat=False,
            verbose=False,
            backend="pytorch",
        )
    counted = sum(p.numel() for p in model.parameters())
    return int(macs or 0), int(params or counted)

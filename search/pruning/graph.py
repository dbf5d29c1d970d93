"""torch-pruning's dependency graph of a model, built the one way every pruning in this tool uses.

Some CNNs hold parameters outside any layer torch-pruning knows: ConvNeXt multiplies each
block's output by a per-channel ``layer_scale`` of shape ``(C, 1, 1)``. torch-pruning prunes such
a parameter along its last dimension longer than 1, which for a per-channel scale, bias or
embedding is the channel dimension (checked by the tests on a layer-scaled model), so they are
pruned with the channels they scale; a learned scalar has no channels and is left alone. It also
warns ``Unwrapped parameters detected`` about them on every graph it builds, twenty times in one
``convnext_tiny`` search: :func:`build_graph` keeps that warning, and only that one, quiet.

Importing this module puts :mod:`search.pruning.fast_concat`'s equivalent of torch-pruning's
concatenation re-indexing in place of its own (pruning DenseNet-121 took 2.2 s a copy, most of it there).
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from search.pruning import fast_concat

fast_concat.install()

__all__ = ["build_graph"]


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of ``model`` traced on ``example_input``, without the unwrapped-parameter warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)

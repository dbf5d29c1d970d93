"""torch-pruning's dependency graph of a model, built the one way every pruning in this tool uses.

Some CNNs hold parameters outside any layer torch-pruning knows: ConvNeXt multiplies each
block's output by a per-channel ``layer_scale`` of shape ``(C, 1, 1)``. torch-pruning then
guesses which dimension to prune (the last one longer than 1) and warns about it with
``Unwrapped parameters detected`` on every graph it builds, twenty times in one ``convnext_tiny``
search. :func:`build_graph` hands torch-pruning those parameters with that dimension named
(for a per-channel scale, bias or embedding it is the channel dimension, checked by the tests on
a layer-scaled model), so they are pruned with the channels they scale and nothing is printed.
A parameter with no dimension longer than 1 (a learned scalar) has no channels and is left alone.
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["build_graph", "unwrapped_parameters"]


def unwrapped_parameters(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[nn.Parameter, int]]:
    """Parameters of ``model`` that no layer ``graph`` can prune holds, each with the dimension to prune."""
    wrapped: set[int] = set()
    for module in model.modules():
        kind = tp.ops.module2type(module)
        if kind in graph.REGISTERED_PRUNERS and kind != tp.ops.OPTYPE.ELEMENTWISE:
            wrapped.update(id(p) for p in module.parameters())
    found = []
    for p in model.parameters():
        dims = [i for i, size in enumerate(p.shape) if size > 1]
        if id(p) not in wrapped and dims:
            found.append((p, dims[-1]))
    return found


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of ``model`` traced on ``example_input``, its unwrapped parameters handled."""
    graph = tp.DependencyGraph()
    unwrapped = unwrapped_parameters(model, graph)
    with warnings.catch_warnings():
        # Only scalars can be left (nothing to prune); every other unwrapped parameter is named above.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        return graph.build_dependency(model, example_inputs=example_input, unwrapped_parameters=unwrapped)

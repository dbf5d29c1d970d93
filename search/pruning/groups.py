"""Grouped convolutions (ResNeXt, RegNet, a user's own) lose whole groups, never single channels.

torch-pruning couples a grouped convolution's input channels with the layer that feeds it and its
output channels with the layers it feeds, in two separate groups of coupled channels, and prunes
each by its own indices; the convolution's weight then no longer fits its ``groups`` (ONNX
Runtime's ``INDICES element is out of DATA bounds``). A grouped convolution stays sound when the
same whole groups go from its inputs and its outputs: each remaining group keeps its own filters
reading its own inputs, and ``groups`` drops by the number removed. Channels kept are then a
multiple of the group width.

Here the torch-pruning groups a grouped convolution links are joined into one *unit*; a unit's
groups are scored per convolution group and pruned by the same group numbers. The history is
recorded like torch-pruning's own, and :func:`replay` redoes it (export, ``model.pt``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from search.pruning.graph import build_graph

__all__ = ["GroupedUnit", "grouped_convs", "link_grouped", "prune_whole_groups", "replay"]


@dataclass(frozen=True)
class GroupWidths:
    """A grouped convolution's shape before pruning: number of groups and channels per group."""

    groups: int
    width_in: int
    width_out: int


@dataclass
class GroupedUnit:
    """Torch-pruning groups joined by grouped convolutions, pruned by the same group numbers."""

    groups: int
    """Number of convolution groups every member is cut into."""
    members: list[Any] = field(default_factory=list)
    """The torch-pruning groups, in the order they were found."""


def grouped_convs(model: nn.Module) -> dict[nn.Conv2d, GroupWidths]:
    """Every grouped convolution that is not depthwise, with its widths."""
    found = {}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
            g = module.groups
            found[module] = GroupWidths(g, module.in_channels // g, module.out_channels // g)
    return found


def link_grouped(groups: Iterable[Any], widths: dict[nn.Conv2d, GroupWidths]) -> dict[int, GroupedUnit]:
    """Join the groups that share a grouped convolution; map each member's ``id`` to its unit.

    A unit whose grouped convolutions disagree on the number of groups (or that holds a bare
    ``nn.Parameter``) is left out: its channels are not pruned.
    """
    groups = list(groups)
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    touching: dict[nn.Conv2d, list[int]] = {}
    for i, group in enumerate(groups):
        for dep, _ in group:
            if dep.target.module in widths:
                touching.setdefault(dep.target.module, []).append(i)
    for members in touching.values():
        for i in members[1:]:
            parent[find(i)] = find(members[0])
    components: dict[int, list[int]] = {}
    for i in {i for members in touching.values() for i in members}:
        components.setdefault(find(i), []).append(i)
    units: dict[int, GroupedUnit] = {}
    for members in components.values():
        convs = {dep.target.module for i in members for dep, _ in groups[i] if dep.target.module in widths}
        counts = {widths[c].groups for c in convs}
        parameters = any(dep.target.type == tp.ops.OPTYPE.PARAMETER for i in members for dep, _ in groups[i])
        unit = GroupedUnit(groups=counts.pop() if len(counts) == 1 and not parameters else 0)
        unit.members = [groups[i] for i in sorted(members)]
        for group in unit.members:
            units[id(group)] = unit
    return units


def prune_whole_groups(graph: Any, group: Any, idxs: list[int], widths: dict[nn.Conv2d, GroupWidths]) -> None:
    """Prune ``group`` by ``idxs`` (whole convolution groups), doing the grouped convolutions by hand."""
    root = group[0].dep
    _prune(graph, graph.get_pruning_group(root.target.module, root.handler, idxs), widths)
    name = graph._module2name[root.target.module]
    graph._pruning_history.append([name, graph.is_out_channel_pruning_fn(root.handler), list(idxs)])


def replay(model: nn.Module, history: list[Any], example: torch.Tensor) -> None:
    """Remove from ``model`` exactly the channels a recorded history removed (grouped convolutions included)."""
    widths = grouped_convs(model)
    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        graph = build_graph(model.eval(), example)
    if not widths:
        graph.load_pruning_history([(name, bool(out), list(idxs)) for name, out, idxs in history])
        return
    modules = dict(model.named_modules())
    for name, out, idxs in history:
        module = modules[name]
        pruner = graph.get_pruner_of_module(module)
        handler = pruner.prune_out_channels if out else pruner.prune_in_channels
        pruned = graph.get_pruning_group(module, handler, list(idxs))
        if any(dep.target.module in widths for dep, _ in pruned):
            _prune(graph, pruned, widths)
        else:
            pruned.prune(record_history=False)


def _prune(graph: Any, group: Any, widths: dict[nn.Conv2d, GroupWidths]) -> None:
    for dep, idxs in group:
        module = dep.target.module
        if module in widths:
            _cut_groups(module, list(idxs), graph.is_out_channel_pruning_fn(dep.handler), widths[module])
        else:
            dep(idxs)


def _cut_groups(conv: nn.Conv2d, idxs: list[int], outputs: bool, widths: GroupWidths) -> None:
    """Remove whole groups from a grouped convolution's outputs (weight rows) or inputs (``groups``)."""
    width = widths.width_out if outputs else widths.width_in
    if len(idxs) % width:
        raise ValueError(f"{len(idxs)} channels are not whole groups of {width} channels")
    if outputs:
        keep = torch.tensor(sorted(set(range(conv.out_channels)) - set(idxs)), dtype=torch.long)
        conv.weight = nn.Parameter(conv.weight.data.index_select(0, keep))
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.data.index_select(0, keep))
        conv.out_channels = len(keep)
    else:
        conv.in_channels -= len(idxs)
        conv.groups -= len(idxs) // width

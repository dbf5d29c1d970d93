"""Refuse models that write in place into a view of their channels, which torch-pruning cannot follow.

timm's GhostNet concatenates a primary convolution with cheap depthwise features, keeps
``out[:, :out_chs]`` (a view of the concatenation) and then adds its shortcut in place
(``x += shortcut``). Autograd records that as ``CopySlices``/``AsStrided`` nodes; torch-pruning
takes them for element-wise operations and maps the whole stream's channel indices through them
onto both halves of the concatenation, so one pruning step empties whole layers (``ghostnet_100``
at ``uniform(0.5)``: ``RuntimeError: ... expected weight to be at least 1 at dimension 0, but got
weight of size [0, 2, 1, 1]``). Such a model is refused before anything is pruned, naming the
module that writes into the view.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from search.errors import UsageError

__all__ = ["check_no_inplace_views", "inplace_view_modules"]

_VIEW_WRITES = ("CopySlices",)
"""Autograd's node for an in-place write into a view (``x[:, :n] += y``, ``x += y`` where x is a slice).

Its companion ``AsStridedBackward`` is not one: ConvNeXt's head has one after its mean, and prunes soundly.
"""

_LAYERS = (nn.Conv2d, nn.Linear)


def inplace_view_modules(model: nn.Module, graph: Any) -> list[str]:
    """Qualified names of the modules whose forward writes in place into a view, in model order."""
    names = {module: name for name, module in model.named_modules()}
    found: set[str] = set()
    for node in graph.module2node.values():
        layers = _layers_before(node) if _writes_view(node) else []
        if layers:
            found.add(_owner(layers, names))
    order = {name: i for i, name in enumerate(names.values())}
    return sorted(found, key=lambda n: order.get(n, len(order)))


def check_no_inplace_views(model: nn.Module, graph: Any) -> None:
    """Raise :class:`UsageError` naming the first module that writes into a view of its channels, if any."""
    found = inplace_view_modules(model, graph)
    if not found:
        return
    first = found[0]
    kind = type(model.get_submodule(first)).__name__ if first else type(model).__name__
    others = len(found) - 1
    more = f"; {others} more module{'s do' if others > 1 else ' does'} too" if others else ""
    raise UsageError(
        f"model {type(model).__name__} is not supported: its module {first or '(top level)'} ({kind}) "
        f"writes in place into a slice of its channels (out[:, :n] then +=, as GhostNet does{more}), which "
        "torch-pruning's dependency graph cannot follow, so pruning would empty whole layers; search a CNN "
        "without it (mobilenet_v3_small, mnasnet0_5, regnet_x_400mf are of similar cost)"
    )


def _writes_view(node: Any) -> bool:
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is None or isinstance(node.module, _LAYERS):
        return False
    return any(kind in grad_fn.name() for kind in _VIEW_WRITES)


def _layers_before(node: Any) -> list[nn.Module]:
    """The layers whose outputs reach ``node`` through neither another layer nor an earlier write into a view."""
    layers, seen, todo = [], set(), list(node.inputs)
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, _LAYERS):
            layers.append(current.module)
        elif not _writes_view(current) or current is node:
            todo.extend(current.inputs)
    return layers


def _owner(layers: list[nn.Module], names: dict[nn.Module, str]) -> str:
    """The innermost module holding the layers in ``layers``; the earliest are left out while that is the model.

    A write at the end of a block reads the block's own layers and, through its shortcut, the layer
    before the block (the stem, for the first block): the block is the module to name.
    """
    order = {module: i for i, module in enumerate(names)}
    paths = [names.get(layer, "").split(".") for layer in sorted(layers, key=lambda m: order.get(m, -1))]
    while paths:
        if len(paths) == 1:  # a single layer: the module around it
            return ".".join(paths[0][:-1])
        common: list[str] = []
        for parts in zip(*paths, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        if common:
            return ".".join(common)
        paths = paths[1:]
    return ""

"""A search space derived from the model itself, for models without a file in ``spaces/``.

CNNs are built as stages: runs of blocks that work at one spatial resolution, each stage ending
where the next one downsamples. This module finds the model's blocks (the children of its
containers, opened until no one block holds a large share of the network's layers), records the
resolution each block outputs on an example input, and makes one stage of each run of blocks at
the same resolution, named in the model's own module names (``layer2``, ``features.4-6``,
``Mixed_5b..Mixed_5d``). Hidden fully connected layers (VGG's and AlexNet's classifier) form a
``head`` stage; the final classifier is never pruned.

:func:`derive_space_text` writes the result as a space file (``cli.py space MODEL`` prints it),
so what a study searched is stored as text like any other space, and a user can copy and edit it.
"""

from __future__ import annotations

import torch
from torch import nn

from search.models.build import build_model, classifier_module, model_family
from search.pruning.space import SearchSpace, load_space, parse_space, shipped_space_path

__all__ = ["derive_space_text", "model_stages", "space_for"]

_SPLIT_SHARE = 0.4
"""A block holding more than this share of the model's layers is opened into its children."""

_HEADER = """\
# Search space derived from {label}'s modules at input {shape} (cli.py space prints it).
# Each stage is a run of blocks whose outputs share one resolution; a stage's modules are
# module-name prefixes of the model. Copy this file, edit the stages and ranges, and pass
# it with --space.
#   stream - channels coupled across several layers (residual additions, concatenations)
#   inner  - each block's own channels
# A ratio r removes a fraction r of those channels; what is kept is rounded up to a
# multiple of round_to (grouped convolutions lose whole groups instead).

family = "{family}"
criteria = ["l1", "l2", "bn_scale", "taylor", "random"]
round_to = [8, 16]
ratio_step = 0.05
uniform_ratios = [0.2, 0.35, 0.5]
uniform_criterion = "l1"
"""


def model_stages(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, list[str]]]:
    """The model's stages in execution order: (name, module-name prefixes)."""
    classifier = classifier_module(model)
    blocks = _blocks(model, classifier)
    keys = _output_keys(model, blocks, example_input)
    ordered = sorted((name for name in blocks if name in keys), key=lambda name: keys[name][0])
    stages: list[tuple[str, list[str]]] = []
    previous = None
    for name in ordered:
        key = keys[name][1]
        if stages and key == previous:
            stages[-1][1].append(name)
        else:
            stages.append(("", [name]))
        previous = key
    named = [(_stage_name(modules), modules) for _, modules in stages]
    return _unique(named)


def derive_space_text(model: nn.Module, example_input: torch.Tensor, *, label: str, family: str) -> str:
    """A space file (TOML) for ``model``: one stage per run of blocks at one resolution."""
    shape = "x".join(str(s) for s in example_input.shape[1:])
    lines = [_HEADER.format(label=label, shape=shape, family=family)]
    for name, modules in model_stages(model, example_input):
        listed = ", ".join(f'"{m}"' for m in modules)
        lines.append(f'[stages."{name}"]\nmodules = [{listed}]\nstream = [0.0, 0.5]\ninner = [0.0, 0.6]\n')
    return "\n".join(lines)


def _prunable(module: nn.Module, classifier: nn.Module | None) -> int:
    """Conv and linear layers inside ``module``, the classifier not counted."""
    return sum(1 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not classifier)


def _blocks(model: nn.Module, classifier: nn.Module | None) -> list[str]:
    """Qualified names of the model's blocks, opening containers that hold a large share of its layers."""
    total = max(1, _prunable(model, classifier))
    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
        with_layers = [c for _, c in children if _prunable(c, classifier)]
        large = _prunable(module, classifier) > _SPLIT_SHARE * total
        if module is model or (large and len(with_layers) >= 2):
            for name, child in children:
                visit(name, child)
        elif _prunable(module, classifier):
            blocks.append(prefix)

    visit("", model)
    return blocks


def _output_keys(model: nn.Module, blocks: list[str], example: torch.Tensor) -> dict[str, tuple[int, object]]:
    """Per block that runs: (order of its first call, its output's resolution or ``"head"``)."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, object]] = {}
    hooks = []
    for name in blocks:

        def record(_module: nn.Module, _inputs: object, output: object, name: str = name) -> None:
            if name not in seen:
                resolution = tuple(output.shape[2:]) if isinstance(output, torch.Tensor) and output.dim() == 4 else None
                seen[name] = (len(seen), resolution if resolution is not None else "head")

        hooks.append(modules[name].register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _stage_name(modules: list[str]) -> str:
    """``layer2``; ``features.4-6`` for indexed siblings; ``Mixed_5b..Mixed_5d`` otherwise."""
    if len(modules) == 1:
        return modules[0]
    first, last = modules[0], modules[-1]
    parent, _, first_leaf = first.rpartition(".")
    last_parent, _, last_leaf = last.rpartition(".")
    if parent and parent == last_parent:
        joint = "-" if first_leaf.isdigit() and last_leaf.isdigit() else ".."
        return f"{parent}.{first_leaf}{joint}{last_leaf}"
    return f"{first}..{last}"


def _unique(stages: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Stage names made unique (``features.0-2``, ``features.0-2~2``), in order."""
    seen: dict[str, int] = {}
    out = []
    for name, modules in stages:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}~{seen[name]}", modules))
    return out


def space_for(
    model_name: str,
    space_file: str | None,
    num_classes: int,
    example_input: torch.Tensor,
    *,
    model: nn.Module | None = None,
) -> SearchSpace:
    """The space a search uses: ``--space``, else the file shipped for the model (``spaces/mobilenet_v2_cifar.toml``)
    or for its architecture (``spaces/resnet18.toml`` for ``resnet18_cifar``), else one derived here."""
    if space_file:
        return load_space(space_file)
    arch = model_family(model_name)
    shipped = shipped_space_path(model_name) or shipped_space_path(arch)
    if shipped is not None:
        return load_space(shipped)
    model = model if model is not None else build_model(model_name, num_classes)  # the caller's fresh one, if given
    text = derive_space_text(model, example_input, label=model_name, family=arch or "custom")
    return parse_space(text, f"derived from {model_name}")

"""Which torchvision classifiers the tool searches, by family, and which it refuses up front.

Every classification model that ``torchvision.models.list_models()`` names in a CNN family can
be given to ``--model`` by its bare name. Families with an obvious small-input form also get a
``NAME_cifar`` variant for 32×32 images. Transformer classifiers are refused with the reason,
and so are CNNs whose graph torch-pruning cannot trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision

__all__ = ["CNN_FAMILIES", "REFUSED_FAMILIES", "ModelSpec", "family_of", "known_models", "refusal"]

CNN_FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet",),
    "resnext": ("resnext",),
    "wide_resnet": ("wide_resnet",),
    "mobilenet_v2": ("mobilenet_v2",),
    "mobilenet_v3": ("mobilenet_v3",),
    "efficientnet": ("efficientnet_b",),
    "efficientnet_v2": ("efficientnet_v2",),
    "regnet": ("regnet_",),
    "convnext": ("convnext",),
    "mnasnet": ("mnasnet",),
    "squeezenet": ("squeezenet",),
    "densenet": ("densenet",),
    "googlenet": ("googlenet",),
    "inception_v3": ("inception_v3",),
    "vgg": ("vgg",),
    "alexnet": ("alexnet",),
}
"""Family -> name prefixes of its torchvision models (searched end to end)."""

REFUSED_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "shufflenet_v2": (
        ("shufflenet_v2",),
        "its channel shuffle (a view/transpose that interleaves channels across branches) cannot be traced by "
        "torch-pruning's dependency graph, so no channel can be removed safely; search a CNN without channel "
        "shuffles (mobilenet_v2, mnasnet0_5, regnet_x_400mf are of similar cost)",
    ),
    "vision transformer": (
        ("vit_", "swin_", "maxvit_"),
        "it is a transformer classifier: this tool removes CNN channels (conv filters and their BatchNorms), "
        "and a transformer's cost sits in attention heads and MLP widths it does not search; pick a CNN family",
    ),
}
"""Families refused at the start: name prefixes and the reason (with what would work instead)."""

_SMALL_INPUT = ("resnet", "resnext", "wide_resnet", "vgg", "mobilenet_v2")
"""Families with an obvious 32×32 form (3×3 stride-1 stem; VGG without its 7×7 pooled head)."""


@dataclass(frozen=True)
class ModelSpec:
    """A known model: the torchvision architecture, its family, and whether it is the small-input form."""

    arch: str
    family: str
    small_input: bool = False


def family_of(arch: str) -> str | None:
    """The CNN family of a torchvision architecture name, or None."""
    for family, prefixes in CNN_FAMILIES.items():
        if arch.startswith(prefixes):
            return family
    return None


def refusal(name: str) -> str | None:
    """Why ``name`` (a torchvision model name, with or without ``_cifar``) is refused, or None."""
    arch = name.removesuffix("_cifar")
    for family, (prefixes, reason) in REFUSED_FAMILIES.items():
        if arch.startswith(prefixes) and arch in _torchvision_classifiers():
            return f"model {name} ({family}) is not supported: {reason}"
    return None


def known_models() -> dict[str, ModelSpec]:
    """Every name ``--model`` takes, torchvision's order, each full-size model before its variant."""
    known: dict[str, ModelSpec] = {}
    for arch in _torchvision_classifiers():
        family = family_of(arch)
        if family is None:
            continue
        known[arch] = ModelSpec(arch, family)
        if family in _SMALL_INPUT:
            known[f"{arch}_cifar"] = ModelSpec(arch, family, small_input=True)
    return known


def _torchvision_classifiers() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))

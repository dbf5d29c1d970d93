"""Build the models a study searches over.

A model is named either by a key of :data:`KNOWN_MODELS` (every torchvision classification CNN,
see :mod:`search.models.families`, plus ``*_cifar`` small-input variants: ResNets with a 3×3
stride-1 ``conv1`` and no max-pool, VGGs without the 7×7 pooled head, MobileNetV2 with stride 1
in its stem and in the first block of its 24-channel stage) or as ``package.module:function``,
an importable factory returning an ``nn.Module``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from search.errors import UsageError
from search.models.families import ModelSpec, known_models, refusal

__all__ = [
    "KNOWN_MODELS",
    "ModelSpec",
    "build_model",
    "check_model_name",
    "classifier_module",
    "classifier_name",
    "model_family",
]


KNOWN_MODELS: dict[str, ModelSpec] = known_models()

_AUX_HEADS = ("googlenet", "inception_v3")
"""Built without their auxiliary classifiers: training then returns plain logits, as evaluation does."""


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model ``name`` with ``num_classes`` outputs."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = KNOWN_MODELS.get(name)
    if spec is not None:
        return _build_known(spec, num_classes)
    if ":" in name:
        return _build_custom(name, num_classes)
    raise _unknown(name)


def check_model_name(name: str) -> None:
    """Refuse an unknown ``--model`` (or a factory that does not import) before any data is loaded."""
    if name in KNOWN_MODELS:
        return
    if ":" not in name:
        raise _unknown(name)
    _import_factory(name)


def _unknown(name: str) -> UsageError:
    refused = refusal(name)
    if refused is not None:
        return UsageError(refused)
    close = difflib.get_close_matches(name, list(KNOWN_MODELS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UsageError(
        f"unknown model {name!r}; {hint}--model takes any torchvision classification CNN by name "
        f"(resnet18, mobilenet_v3_small, efficientnet_b0, regnet_x_400mf, convnext_tiny, ...; "
        f"`cli.py models` lists them all) or a factory as package.module:function"
    )


def model_family(name: str) -> str | None:
    """The torchvision architecture behind ``name`` (``resnet18_cifar`` → ``resnet18``); None for a factory."""
    spec = KNOWN_MODELS.get(name)
    return spec.arch if spec is not None else None


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the model's classifier (``"fc"``, ``"classifier.1"``): see :func:`classifier_module`."""
    name = _find_classifier(model)
    if name is None:
        raise UsageError(f"the model ({type(model).__name__}) has no nn.Linear or nn.Conv2d layer to be its classifier")
    return name


def classifier_module(model: nn.Module) -> nn.Module | None:
    """The layer whose outputs are the classes, never pruned: the last ``nn.Linear``, else the last ``nn.Conv2d``.

    SqueezeNet has no linear layer: a 1×1 convolution with one output per class is its classifier.
    """
    name = _find_classifier(model)
    return None if name is None else model.get_submodule(name)


def _find_classifier(model: nn.Module) -> str | None:
    """Name of the last registered ``nn.Linear`` (else ``nn.Conv2d``), or None when there is neither."""
    linear = conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear = name
        elif isinstance(module, nn.Conv2d):
            conv = name
    return linear if linear is not None else conv


def _build_known(spec: ModelSpec, num_classes: int) -> nn.Module:
    """A torchvision model, in its small-input form when the spec asks for it."""
    extra: dict[str, Any] = {"aux_logits": False, "init_weights": True} if spec.arch in _AUX_HEADS else {}
    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=num_classes, **extra)
    if spec.small_input:
        _SMALL_INPUT_FORMS[spec.family](model, num_classes)
    return model


def _resnet_small_stem(model: nn.Module, num_classes: int) -> None:
    """Replace a ResNet's 7×7 stride-2 conv1 and max-pool for 32×32 inputs."""
    conv = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()


def _vgg_small_head(model: nn.Module, num_classes: int) -> None:
    """VGG for 32×32 inputs: the five max-pools end at 1×1, so one linear layer reads the 512 features."""
    model.avgpool = nn.Identity()
    model.classifier = nn.Linear(512, num_classes)


def _mobilenet_v2_small_strides(model: nn.Module, num_classes: int) -> None:
    """MobileNetV2 for 32×32 inputs: stride 1 in the stem and in the first 24-channel block (ends at 4×4)."""
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)


_SMALL_INPUT_FORMS: dict[str, Callable[[nn.Module, int], None]] = {
    "resnet": _resnet_small_stem,
    "resnext": _resnet_small_stem,
    "wide_resnet": _resnet_small_stem,
    "vgg": _vgg_small_head,
    "mobilenet_v2": _mobilenet_v2_small_strides,
}


def _build_custom(name: str, num_classes: int) -> nn.Module:
    """Import ``package.module:function`` and call it to get the model."""
    factory = _import_factory(name)
    takes = _accepts_num_classes(factory)
    needed = _required_arguments(factory, takes)
    if needed:
        raise UsageError(
            f"model factory {name} needs {', '.join(needed)}; give one that takes no arguments, or only num_classes="
        )
    try:
        model = factory(num_classes=num_classes) if takes else factory()
    except Exception as error:  # the user's code: where it failed, in one line
        raise UsageError(f"model factory {name} raised {type(error).__name__}: {error}{_where(error)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model factory {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(name: str) -> Callable[..., Any]:
    """The callable named by ``package.module:function`` (dotted attributes allowed)."""
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise UsageError(f"model {name!r} is not of the form package.module:function")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(
            f"cannot import module {module_name!r} for model {name}: "
            f"{type(error).__name__}: {error}{_import_hint(module_name, error)}"
        ) from error
    except SyntaxError as error:
        raise UsageError(
            f"cannot import module {module_name!r} for model {name}: SyntaxError at {error.filename}:{error.lineno}: "
            f"{error.msg}"
        ) from None
    except Exception as error:  # the module's own code failed while it was imported
        raise UsageError(
            f"cannot import module {module_name!r} for model {name}: {type(error).__name__}: {error}{_where(error)}"
        ) from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError as error:
            raise UsageError(
                f"cannot find {attr_path!r} in module {module_name!r} for model {name}: AttributeError: {error}"
            ) from error
    if not callable(target):
        raise UsageError(f"{name} is a {type(target).__name__}, not a function returning a model")
    return target


def _import_hint(module_name: str, error: ImportError) -> str:
    """A hint for the usual reasons a user's model module does not import."""
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        return " (give the module's import name, e.g. mypkg.models:net, not a file path)"
    if isinstance(error, ModuleNotFoundError) and error.name == module_name.split(".")[0]:
        return " (is its directory on PYTHONPATH?)"
    return ""


def _where(error: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame the error passed through."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def _required_arguments(factory: Callable[..., Any], takes_num_classes: bool) -> list[str]:
    """The parameters ``factory`` requires beyond ``num_classes`` (which the call passes when it takes it)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    passed = {"num_classes"} if takes_num_classes else set()
    required = [p for p in parameters if p.kind in plain and p.default is inspect.Parameter.empty]
    return [p.name for p in required if p.name not in passed]


def _accepts_num_classes(factory: Callable[..., Any]) -> bool:
    """Whether ``factory(num_classes=...)`` is a valid call."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if parameter.name == "num_classes" and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False

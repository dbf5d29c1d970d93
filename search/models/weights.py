"""Load the weights users bring into a model built by :mod:`search.models.build`.

Weights come from a file (a plain state_dict, the same saved from ``nn.DataParallel``, the
``{"state_dict": ...}`` wrappers of common training scripts, or this tool's own checkpoint,
see :func:`~search.models.checkpoint.save_checkpoint`) or are torchvision's published ImageNet
weights (``"imagenet"``), read from the torch hub cache (``torch.hub.get_dir()/checkpoints``) and
downloaded there first when missing, as torchvision does: with its progress bar and its check of the
SHA-256 prefix in the file name. A file already in the cache is read as it is, as torchvision
does (its SHA-256 is recorded with the baseline). Offline, or on a hash mismatch, the error is one
line naming the URL and the file to put it at.
Every file is read with ``torch.load(weights_only=True)``, and weights that don't fit the model
are refused with a :class:`~search.errors.UsageError` naming the mismatching layers and their shapes.
"""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from search.errors import UsageError
from search.models.build import KNOWN_MODELS, _find_classifier, build_model, model_family
from search.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    _existing_file,
    _reason,
    _torch_load,
    file_sha256,
)
from search.progress import NullReporter, Reporter

__all__ = [
    "LoadedWeights",
    "load_weights",
]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly store the state_dict in a checkpoint dict."""

_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes added by ``nn.DataParallel``/``DistributedDataParallel`` and ``torch.compile``."""

_MAX_LISTED = 3


@dataclass(frozen=True)
class LoadedWeights:
    """Where the weights loaded into a model came from."""

    source: str
    """The path as given, or ``"imagenet"``."""
    kind: str
    """``"state_dict"`` (including training-script wrappers), ``"checkpoint"`` or ``"imagenet"``."""
    sha256: str | None
    """SHA-256 of the file read (for ``"imagenet"``, of the file in the torch hub cache)."""
    stripped_prefix: str | None
    """The key prefix removed from every key (``"module."`` for DataParallel), if any."""


# --------------------------------------------------------------------------- loading


def load_weights(model: nn.Module, source: str, *, model_name: str, reporter: Reporter | None = None) -> LoadedWeights:
    """Load ``source`` (a weights file or ``"imagenet"``) into ``model`` after checking the fit."""
    if source == "imagenet":
        return _load_imagenet(model, model_name, reporter or NullReporter())
    path = _existing_file(source)
    obj = _torch_load(path, source)
    state, kind, saved_for = _unwrap(obj, source)
    state, prefix = _strip_prefix(state, model)
    _check_fits(model, state, f"weights {source}", model_name, saved_for)
    _load_strict(model, state, f"weights {source}")
    return LoadedWeights(source=source, kind=kind, sha256=file_sha256(path), stripped_prefix=prefix)


def _load_imagenet(model: nn.Module, model_name: str, reporter: Reporter) -> LoadedWeights:
    """Load torchvision's published weights for ``model_name`` from the torch hub cache."""
    weights = _imagenet_weights(model_name)
    arch = model_family(model_name)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached):
        reporter.info(f"downloading torchvision's ImageNet weights for {arch} from {weights.url} to {cached}")
        _download(weights.url, cached)
    described = f"torchvision's ImageNet weights for {arch} ({cached})"
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache file is the user's to replace
        raise UsageError(
            f"cannot read {described}: {_reason(error)}; replace the file or pass --weights PATH"
        ) from error
    state = _as_state_dict(state, described)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_AUX_PREFIXES)}  # built without aux heads
    _check_fits(model, state, described, model_name, None)
    _load_strict(model, state, described)
    return LoadedWeights(source="imagenet", kind="imagenet", sha256=file_sha256(cached), stripped_prefix=None)


def _download(url: str, cached: str) -> None:
    """Download ``url`` to ``cached`` as ``torch.hub.load_state_dict_from_url`` does (progress bar on
    stderr, the file's SHA-256 checked against the prefix in its name), or a one-line UsageError."""
    where = f"download it yourself and put it at {cached}, or pass --weights PATH"
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached, match.group(1) if match else None, progress=True)
    except urllib.error.URLError as error:  # offline, refused, name not resolved, HTTP errors
        raise UsageError(f"cannot download {url} ({_url_reason(error)}); {where}") from error
    except RuntimeError as error:  # torch.hub: 'invalid hash value (expected "...", got "...")'
        raise UsageError(
            f"the file downloaded from {url} does not match the hash in its name ({_reason(error)}); "
            f"try again, or {where}"
        ) from error
    except OSError as error:  # a full or read-only disk, a connection reset
        raise UsageError(f"cannot download {url} to {cached} ({_reason(error)}); {where}") from error


def _url_reason(error: urllib.error.URLError) -> str:
    reason = str(error.reason).splitlines() if not isinstance(error, urllib.error.HTTPError) else [str(error)]
    return reason[0] if reason and reason[0] else type(error).__name__


_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
"""GoogLeNet's and Inception v3's auxiliary classifiers, which this tool builds without."""

_GUESSABLE = (
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "mobilenet_v2_cifar",
)  # fmt: skip
"""The models a weights file is compared against when it does not fit the one asked for."""


def _imagenet_weights(model_name: str) -> Any:
    """torchvision's default weights enum member for a known, full-size model."""
    spec = KNOWN_MODELS.get(model_name)
    if spec is None:
        raise UsageError(
            f"ImageNet weights exist only for torchvision's models (`cli.py models` lists them), not {model_name}; "
            "pass --weights PATH"
        )
    if spec.small_input:
        raise UsageError(
            f"torchvision's ImageNet weights are for {spec.arch}'s 7×7 stem and do not fit "
            f"{model_name}'s 3×3 small-input stem; use --model {spec.arch} or pass --weights PATH"
        )
    return torchvision.models.get_model_weights(spec.arch).DEFAULT


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The state_dict inside a loaded file, its kind, and the model name it was saved for."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"weights {source} hold a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        return _unwrap_checkpoint(obj, source)
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return _as_state_dict(obj, f"weights {source}"), "state_dict", None
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            return _as_state_dict(inner, f"weights {source}[{key!r}]"), "state_dict", None
    keys = ", ".join(repr(key) for key in list(obj)[:5]) or "none"
    raise UsageError(
        f"weights {source} are a dict (keys: {keys}) that is neither a state_dict nor a "
        f"checkpoint with a {' / '.join(repr(k) for k in _WRAPPER_KEYS)} entry"
    )


def _unwrap_checkpoint(obj: Mapping[str, Any], source: str) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The state_dict of this tool's checkpoint, after checking its version."""
    version = obj.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UsageError(
            f"checkpoint {source} has format version {version!r}, but this tool reads version "
            f"{CHECKPOINT_VERSION}; it was written by a newer version of the tool"
        )
    state = _as_state_dict(obj.get("state_dict"), f"checkpoint {source}")
    saved_for = obj.get("model_name")
    return state, "checkpoint", saved_for if isinstance(saved_for, str) else None


def _as_state_dict(obj: Any, described: str) -> dict[str, torch.Tensor]:
    """``obj`` if it is a non-empty mapping of names to tensors, else a UsageError."""
    if not isinstance(obj, Mapping) or not obj:
        raise UsageError(f"{described} hold no state_dict (found {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UsageError(
                f"{described} are not a state_dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return obj if isinstance(obj, dict) else dict(obj)


def _strip_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove DataParallel's ``module.`` (or torch.compile's) prefix when every key has it."""
    model_keys = model.state_dict().keys()
    stripped = ""
    for prefix in _STRIPPABLE_PREFIXES:
        if all(key.startswith(prefix) for key in state) and not all(key.startswith(prefix) for key in model_keys):
            state = OrderedDict((key[len(prefix) :], value) for key, value in state.items())
            stripped += prefix
    return state, stripped or None


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], described: str) -> None:
    """``load_state_dict(strict=True)``; the checks before it should make this never fail."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"{described} cannot be loaded: {_reason(error)}") from error


# --------------------------------------------------------------------------- fit checks


@dataclass
class _Mismatch:
    """How a state_dict differs from a model's: shapes, missing and unexpected keys."""

    shapes: list[tuple[str, torch.Size, torch.Size]]
    missing: list[tuple[str, torch.Size]]
    unexpected: list[tuple[str, torch.Size]]

    def __bool__(self) -> bool:
        return bool(self.shapes or self.missing or self.unexpected)


def _compare(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> _Mismatch:
    """Differences between the file's tensors and the model's expected shapes."""
    shapes = [
        (key, state[key].shape, shape) for key, shape in expected.items() if key in state and state[key].shape != shape
    ]
    missing = [
        (key, shape) for key, shape in expected.items() if key not in state and not key.endswith("num_batches_tracked")
    ]
    unexpected = [(key, value.shape) for key, value in state.items() if key not in expected]
    return _Mismatch(shapes, missing, unexpected)


def _check_fits(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    described: str,
    model_name: str,
    saved_for: str | None,
) -> None:
    """Raise a UsageError naming how ``state`` does not fit ``model``; fill BN counters."""
    model_state = model.state_dict()
    expected = {key: value.shape for key, value in model_state.items()}
    mismatch = _compare(state, expected)
    classes = _class_counts(model, state)
    if classes is not None:
        in_file, in_model = classes
        clf = _find_classifier(model)
        others = _without_prefix(mismatch, f"{clf}.")
        besides = f" (they don't fit {model_name} otherwise either: {_describe(others)})"
        raise UsageError(
            f"{described} have {in_file} output classes but the data has {in_model} classes; "
            f"pass weights trained for these {in_model} classes{besides if others else ''}"
        )
    if mismatch:
        raise UsageError(
            f"{described} don't fit {model_name}: {_describe(mismatch, model_name)}"
            + _guess_hint(state, mismatch, model_name, saved_for)
        )
    for key, value in model_state.items():
        if key not in state:  # only BatchNorm's num_batches_tracked gets here
            state[key] = value


def _class_counts(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(classes in the file, classes of the model) when the classifier's outputs differ."""
    clf = _find_classifier(model)
    if clf is None:
        return None
    key = f"{clf}.weight"
    weight = state.get(key)
    own = model.state_dict()[key]
    if weight is None or weight.dim() < 2 or weight.shape[0] == own.shape[0]:
        return None
    return int(weight.shape[0]), int(own.shape[0])


def _without_prefix(mismatch: _Mismatch, prefix: str) -> _Mismatch:
    """The mismatch without entries under ``prefix`` (the classifier, reported apart)."""
    return _Mismatch(
        [entry for entry in mismatch.shapes if not entry[0].startswith(prefix)],
        [entry for entry in mismatch.missing if not entry[0].startswith(prefix)],
        [entry for entry in mismatch.unexpected if not entry[0].startswith(prefix)],
    )


def _describe(mismatch: _Mismatch, model_name: str | None = None) -> str:
    """``conv1.weight is [..] in the file but [..] in the model (hint); missing: ...``."""
    parts = []
    if mismatch.shapes:
        parts.append(
            ", ".join(
                f"{key} is {_shape(found)} in the file but {_shape(wanted)} in the model"
                + _stem_hint(key, found, wanted, model_name)
                for key, found, wanted in mismatch.shapes[:_MAX_LISTED]
            )
            + _more(mismatch.shapes)
        )
    for label, entries in (("missing", mismatch.missing), ("unexpected", mismatch.unexpected)):
        if entries:
            listed = ", ".join(f"{key} {_shape(shape)}" for key, shape in entries[:_MAX_LISTED])
            parts.append(f"{label}: {listed}{_more(entries)}")
    return "; ".join(parts)


def _more(entries: Sequence[Any]) -> str:
    """`` (and N more)`` when a list was cut short."""
    extra = len(entries) - _MAX_LISTED
    return f" (and {extra} more)" if extra > 0 else ""


def _shape(shape: torch.Size) -> str:
    """``[64,3,7,7]``."""
    return "[" + ",".join(str(size) for size in shape) + "]"


def _stem_hint(key: str, found: torch.Size, wanted: torch.Size, model_name: str | None) -> str:
    """Point at the other stem when a ResNet's conv1 is 3×3 in one and 7×7 in the other."""
    family = model_family(model_name) if model_name else None
    if key != "conv1.weight" or family is None or len(found) != 4 or len(wanted) != 4:
        return ""
    cifar = f"{family}_cifar"
    if tuple(found[2:]) == (3, 3) and tuple(wanted[2:]) == (7, 7) and cifar in KNOWN_MODELS:
        return f" (a small-input variant? try --model {cifar})"
    if tuple(found[2:]) == (7, 7) and tuple(wanted[2:]) == (3, 3):
        return f" (ImageNet-style 7×7 stem? try --model {family})"
    return ""


def _guess_hint(state: Mapping[str, torch.Tensor], mismatch: _Mismatch, model_name: str, saved_for: str | None) -> str:
    """``; they look like resnet34 weights: try --model resnet34`` when that is clear."""
    if any(_stem_hint(key, found, wanted, model_name) for key, found, wanted in mismatch.shapes):
        return ""
    guess = saved_for if saved_for and saved_for != model_name else _matching_known_model(state)
    if guess is None or guess == model_name:
        return ""
    return f"; they look like {guess} weights: try --model {guess}"


def _matching_known_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """The known model whose layers ``state`` fits exactly (any class count), if one does."""
    for name in _GUESSABLE:
        with torch.device("meta"):
            candidate = build_model(name, 1)
        clf = _find_classifier(candidate)
        weight = state.get(f"{clf}.weight")
        if weight is None or weight.dim() != 2:
            continue
        expected = {key: value.shape for key, value in candidate.state_dict().items()}
        for key in (f"{clf}.weight", f"{clf}.bias"):
            if key in expected:
                expected[key] = torch.Size((weight.shape[0], *expected[key][1:]))
        if not _compare(state, expected):
            return name
    return None

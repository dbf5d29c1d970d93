"""This tool's checkpoints (written atomically, read back with ``weights_only=True``), the
safe ``torch.load`` that every weights file goes through, and the SHA-256 that identifies a file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.errors import UsageError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "file_sha256",
    "read_checkpoint_meta",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "prune-search/checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: nn.Module, *, model_name: str, num_classes: int, meta: dict) -> str:
    """Write this tool's checkpoint atomically; return the file's SHA-256.

    ``meta`` must hold only str/int/float/bool/None in dicts (str keys), lists and tuples,
    so that :func:`read_checkpoint_meta` can read it back with ``weights_only=True``.
    """
    _check_plain(meta, "meta")
    state = OrderedDict((key, value.detach().cpu()) for key, value in model.state_dict().items())
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": model_name,
        "num_classes": num_classes,
        "state_dict": state,
        "meta": meta,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = file_sha256(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return digest


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data that ``weights_only`` loading accepts."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoint meta must be plain data")


def read_checkpoint_meta(path: str | Path) -> dict | None:
    """The ``meta`` of this tool's checkpoint, or None when the file is anything else."""
    source = str(path)
    obj = _torch_load(_existing_file(source), source)
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        return None
    meta = obj.get("meta")
    return dict(meta) if isinstance(meta, Mapping) else {}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading files


def _existing_file(source: str) -> Path:
    """``source`` as a path to an existing regular file, or a UsageError."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"weights file {source} does not exist")
    if not path.is_file():
        raise UsageError(f"weights {source} is not a file")
    return path


def _torch_load(path: Path, source: str) -> Any:
    """``torch.load(weights_only=True)`` with failures explained in one line."""
    if _is_torchscript(path):
        raise UsageError(
            f"weights {source} are a TorchScript program (torch.jit.save), not a state_dict; pass the state_dict "
            "(an export's model.pt, or torch.save(model.state_dict(), path))"
        )
    try:
        with warnings.catch_warnings():  # torch's own warnings about the file: the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise UsageError(_not_weights_only_message(source, str(error))) from error
        raise UsageError(_unreadable_message(source, error)) from error
    except Exception as error:  # whatever a damaged or foreign file makes torch.load raise
        raise UsageError(_unreadable_message(source, error)) from error


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and code)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _not_weights_only_message(source: str, detail: str) -> str:
    """Why a pickle that needs ``weights_only=False`` is refused, and what to save instead."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", detail)
    holding = f" (it holds {found.group(1)})" if found else ""
    return (
        f"weights {source} are a pickle that can only be read with weights_only=False{holding}; "
        "only state_dicts (torch.save(model.state_dict(), path)), the usual "
        "{'state_dict': ...} checkpoint dicts and this tool's checkpoints are accepted"
    )


def _unreadable_message(source: str, error: Exception) -> str:
    """A one-line explanation that torch.load could not read the file."""
    reason = _reason(error)
    return f"weights {source} cannot be read by torch.load ({reason}); is it a PyTorch file?"


def _reason(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for one line."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 200:
        first = first[:200] + "…"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__

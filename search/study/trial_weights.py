"""Where a trial's fine-tuned pruned weights are kept, so a promotion continues from them.

``<folder>/trial-N/rung-R.pt`` holds trial N's state dict after rung R's fine-tune, the total
steps behind it and its architecture hash. Files are written to a temporary name and renamed, so
a worker killed while saving leaves the previous rung's file intact and no half-written one.
Workers on several hosts need this folder on a path they all see (``--trial-weights``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["file_sha256", "load_weights_into", "save_weights", "weights_path"]


def weights_path(folder: Path, number: int, rung: int) -> Path:
    return Path(folder) / f"trial-{number}" / f"rung-{rung}.pt"


def save_weights(path: Path, model: nn.Module, *, steps: int, arch_hash: str | None) -> None:
    """``model``'s weights (on the CPU) with the total fine-tune ``steps`` behind them, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    try:
        torch.save({"state_dict": state, "steps": steps, "arch_hash": arch_hash}, partial)
        os.replace(partial, path)
    finally:  # a full disk: no half-written file left in the trial's folder
        partial.unlink(missing_ok=True)


def load_weights_into(model: nn.Module, path: Path, arch_hash: str | None = None) -> dict[str, Any]:
    """Load the weights saved at ``path`` into ``model`` (of the same architecture); the file's other fields.

    ``arch_hash``: the trial's; a file saved for another architecture (a deleted study's of the same name, whose
    shapes happen to fit) is refused rather than continued from."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if arch_hash is not None and saved.get("arch_hash") not in (None, arch_hash):
        raise ValueError(f"{path} holds weights of another architecture ({saved.get('arch_hash')}, not {arch_hash})")
    model.load_state_dict(saved["state_dict"])
    return {k: v for k, v in saved.items() if k != "state_dict"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]

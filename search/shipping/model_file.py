"""The shipped PyTorch files: ``model.pt`` (rebuilt by :func:`load_pruned`) and ``model.torchscript.pt``.

A pruned state_dict alone does not fit the unpruned torchvision class, so ``model.pt`` keeps
the model name and the pruning history beside the weights: :func:`load_pruned` builds the
unpruned class, prunes it as recorded, then loads the weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import torch
from torch import nn

from search.data.dataset import Dataset
from search.errors import UsageError
from search.models.build import build_model
from search.shipping.rebuild import StudyBaseline, replay_history

__all__ = ["PRUNED_FORMAT", "load_pruned", "save_pruned", "save_torchscript"]

PRUNED_FORMAT = "prune-search/pruned-model"


def save_pruned(path: Path, model: nn.Module, base: StudyBaseline, trial: optuna.trial.FrozenTrial) -> None:
    """``model.pt``: the model name, input size and pruning history with the fine-tuned weights."""
    torch.save(
        {
            "format": PRUNED_FORMAT,
            "version": 1,
            "model_name": base.model_name,
            "num_classes": base.data.num_classes,
            "input_size": base.data.input_size,
            "pruning_history": trial.user_attrs["pruning_history"],
            "state_dict": model.state_dict(),
        },
        path,
    )


def save_torchscript(path: Path, model: nn.Module, data: Dataset) -> None:
    """``model.torchscript.pt``: loads with ``torch.jit.load``, no class definitions needed."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream but still loads everywhere
        traced = torch.jit.trace(model.eval(), data.example_input())
    traced.save(str(path))


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild an exported pruned model (``model.pt``): the unpruned class, pruned as recorded, then the weights."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != PRUNED_FORMAT:
        raise UsageError(f"{path} is not a pruned model written by export")
    model = build_model(saved["model_name"], saved["num_classes"])
    size = int(saved["input_size"])
    replay_history(model, saved["pruning_history"], torch.zeros(1, 3, size, size))
    model.load_state_dict(saved["state_dict"])
    return model.eval()

"""A chosen trial's pruned model, rebuilt from what the study stored.

The study keeps its baseline (model name, weights file and its SHA-256), its data settings and
each trial's torch-pruning history. Rebuilding loads the same data and baseline (refusing a
baseline file that changed since the search), replays the history, and checks the result has the
architecture the trial measured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.data.dataset import Dataset
from search.data.loading import load_dataset
from search.data.spec import DataSpec
from search.errors import UsageError
from search.models.build import build_model
from search.models.checkpoint import file_sha256
from search.models.weights import load_weights
from search.progress import Reporter
from search.pruning.channels import architecture_hash
from search.pruning.groups import replay

__all__ = ["StudyBaseline", "load_study_baseline", "rebuild_pruned", "replay_history"]


@dataclass
class StudyBaseline:
    """What the study was run on, rebuilt from what it stored."""

    study: optuna.Study
    data: Dataset
    model: nn.Module
    model_name: str
    weights: str
    sha256: str | None
    threads: int


def load_study_baseline(
    study: optuna.Study, *, weights: str | None = None, reporter: Reporter | None = None
) -> StudyBaseline:
    """Load the study's data and baseline, refusing a baseline file that changed since the search."""
    attrs = study.user_attrs
    if "config" not in attrs or "baseline" not in attrs:
        raise UsageError(f"study {study.study_name!r} was not made by this tool's search")
    config = attrs["config"]
    spec = dict(config["data"])
    for key in ("mean", "std"):
        if spec.get(key) is not None:
            spec[key] = tuple(spec[key])
    data = load_dataset(DataSpec(**spec), reporter)
    stored = attrs["baseline"]
    path = weights or stored["weights"]
    if path != "imagenet" and not Path(path).is_file():
        raise UsageError(
            f"the study's baseline {path} is missing; pass --weights PATH to a copy of it (checked by hash)"
        )
    if path != "imagenet" and stored.get("sha256") and file_sha256(path) != stored["sha256"]:
        raise UsageError(
            f"baseline {path} changed since the search (sha256 {file_sha256(path)[:12]}, the study used "
            f"{stored['sha256'][:12]}); export from the file the study searched on"
        )
    model = build_model(stored["model"], data.num_classes)
    loaded = load_weights(model, path, model_name=stored["model"])
    model.eval()
    return StudyBaseline(study, data, model, stored["model"], path, loaded.sha256, int(config.get("threads", 1)))


def rebuild_pruned(base: StudyBaseline, trial: optuna.trial.FrozenTrial) -> nn.Module:
    """The trial's pruned model with the baseline's weights, checked against what it measured."""
    model = copy.deepcopy(base.model)
    replay_history(model, trial.user_attrs["pruning_history"], base.data.example_input())
    arch = architecture_hash(model, tuple(base.data.example_input().shape[1:]))
    if arch != trial.user_attrs.get("arch_hash"):
        raise UsageError(
            f"the rebuilt model of trial {trial.number} does not have the architecture the trial measured "
            f"({arch} vs {trial.user_attrs.get('arch_hash')}); the baseline or torch-pruning version differs"
        )
    return model


def replay_history(model: nn.Module, history: list[Any], example: torch.Tensor) -> None:
    """Remove from ``model`` exactly the channels a recorded torch-pruning history removed."""
    replay(model, history, example)

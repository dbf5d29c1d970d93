"""The run's shared state: the data, the baseline and its meter, and the resumable cache of results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.allocation import DATA, MEAN, STD, log
from benchmarks.carry import ResultsCache
from search.data.dataset import Dataset
from search.data.loading import load_dataset
from search.data.spec import DataSpec
from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.timing import LatencySettings
from search.models.build import build_model
from search.models.weights import load_weights
from search.pruning.auto_space import space_for
from search.pruning.space import SearchSpace

__all__ = ["Bench", "load_data"]


def load_data(folder: Path = DATA) -> Dataset:
    """The shared CIFAR-10 (an ImageFolder of train/val/test) at 32 px, normalised as allocation.py does."""
    mean, std = (tuple(float(v) for v in s.split(",")) for s in (MEAN, STD))
    return load_dataset(DataSpec(f"imagefolder:{folder}", input_size=32, mean=mean, std=std))


class Bench:
    """Everything a candidate's scoring needs, and ``results.json`` (one entry per candidate, fidelity and seed)."""

    def __init__(
        self, work: Path, model: str, weights: Path, timing: LatencySettings, data: Dataset, mirror: Path | None = None
    ) -> None:
        self.work = work
        self.store = ResultsCache(work, mirror)
        """``mirror``: a tracked copy of the results, committed between sessions: the working folder is ignored and
        vanishes with the machine, so a run that takes several sessions picks up what an earlier machine computed
        (a chain whose kept weights are gone is replayed up to its last scored rung)."""
        self.cache: dict[str, Any] = self.store.data
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.data = data
        self.model_name = model
        self.weights = weights
        net = build_model(model, self.data.num_classes)
        load_weights(net, str(weights), model_name=model)
        self.baseline: torch.nn.Module = net.eval()
        space = space_for(model, None, self.data.num_classes, self.data.example_input())
        assert space is not None
        self.space: SearchSpace = space
        self.meter = CandidateMeter(self.baseline, self.data, space=space, timer=LocalTimer(timing))

    def cached(self, key: str, compute: Any) -> Any:
        """``compute()``'s result, kept under ``key`` in results.json (written atomically) and reused on a rerun."""
        if key not in self.cache:
            self.cache[key] = compute()
            self.computed.append(key)
            self.store.save()
        elif key not in self.computed and key not in self.reused:
            self.reused.append(key)
            log(f"reused from an earlier run: {key}")
        return self.cache[key]

    def has(self, key: str) -> bool:
        return key in self.cache

    def stamp(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S")

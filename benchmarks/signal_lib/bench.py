"""The run's shared state: the data, the baseline and its meter, and the resumable cache of results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.allocation import DATA, MEAN, STD, log
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
        work.mkdir(parents=True, exist_ok=True)
        self.cache_path = work / "results.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.mirror = mirror
        """A tracked copy of the results, committed between sessions: the working folder is ignored and vanishes
        with the machine, so a run that takes several sessions picks up what an earlier machine computed
        (a chain whose kept weights are gone is replayed up to its last scored rung)."""
        if mirror is not None and mirror.is_file():
            carried = {k: v for k, v in json.loads(mirror.read_text()).items() if k not in self.cache}
            if carried:
                log(f"{len(carried)} results carried over from {mirror.name}")
                self.cache.update(carried)
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
            partial = self.cache_path.with_suffix(".partial")
            partial.write_text(json.dumps(self.cache, indent=1))
            os.replace(partial, self.cache_path)
            if self.mirror is not None:
                partial = self.mirror.with_suffix(".partial")
                partial.write_text(json.dumps(self.cache, indent=1) + "\n")
                os.replace(partial, self.mirror)
        elif key not in self.computed and key not in self.reused:
            self.reused.append(key)
            log(f"reused from an earlier run: {key}")
        return self.cache[key]

    def has(self, key: str) -> bool:
        return key in self.cache

    def stamp(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S")

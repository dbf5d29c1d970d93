"""Keep the fine-tune's best epoch: every epoch of export's fine-tune is scored on the validation split.

A longer fine-tune can end below where it started (one epoch took an export from 97.77% to
97.03% test top-1), so the weights of the epoch with the best validation top-1 are kept, the
recalibrated weights before any step counting as epoch 0. The held-out test split, which the
card reports, plays no part in the choice. Scores and the best weights live beside the export's
fine-tune checkpoint, so a resumed export remembers them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from search.data.dataset import Dataset
from search.training.evaluate import top1

__all__ = ["BestEpoch"]


class BestEpoch:
    """Validation top-1 by epoch, and the best epoch's weights in ``folder``."""

    def __init__(self, folder: Path, data: Dataset, limit: int | None = None, device: str = "cpu") -> None:
        self._weights = folder / "best-epoch.pt"
        self._scores_file = folder / "best-epoch.json"
        self._data = data
        self._limit = limit
        self._device = device
        self.scores: dict[int, float] = {}
        if self._scores_file.exists() and self._weights.exists():
            self.scores = {int(k): float(v) for k, v in json.loads(self._scores_file.read_text()).items()}

    @property
    def best(self) -> int | None:
        """The epoch with the best validation top-1 (the earliest on a tie), None before any."""
        return max(self.scores, key=lambda e: (self.scores[e], -e)) if self.scores else None

    def consider(self, epoch: int, model: nn.Module) -> None:
        """Score ``model`` after ``epoch`` on the validation split; keep its weights if it is the best so far."""
        self.scores[epoch] = top1(model, self._data, "val", limit=self._limit, device=self._device)
        if self.best == epoch:
            partial = self._weights.with_suffix(".partial")
            torch.save(model.state_dict(), partial)
            os.replace(partial, self._weights)
        partial = self._scores_file.with_name(self._scores_file.name + ".partial")  # a kill mid-write: the last record
        partial.write_text(json.dumps(self.scores))
        os.replace(partial, self._scores_file)

    def restore(self, model: nn.Module) -> int | None:
        """Load the best epoch's weights into ``model`` unless the last epoch is the best; returns the best epoch."""
        best = self.best
        if best is not None and best != max(self.scores):
            model.load_state_dict(torch.load(self._weights, map_location="cpu", weights_only=True))
        return best

    def discard(self) -> None:
        """Remove the files (the export is complete)."""
        self._weights.unlink(missing_ok=True)
        self._scores_file.unlink(missing_ok=True)

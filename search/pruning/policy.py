"""A pruning policy: plain values saying how many channels to remove where, and how to choose them.

A policy is what a search-space turns an Optuna trial into, what the study stores, and what
``export`` rebuilds a model from. It holds no torch-pruning objects: those are built only when
the policy is applied (:mod:`search.pruning.channels`), so a policy round-trips through JSON and SQL storage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CRITERIA", "PRECISIONS", "Policy", "StagePolicy"]

# Channel-importance criteria (names used in space files and stored on trials).
CRITERIA: dict[str, str] = {
    "l1": "L1 norm of each channel's weights, summed over its coupled layers",
    "l2": "L2 norm of each channel's weights, summed over its coupled layers",
    "bn_scale": "absolute BatchNorm scale (gamma) of each channel",
    "taylor": "first-order Taylor estimate |w * dL/dw| on a few training batches",
    "random": "uniformly random channels (a control for the other criteria)",
}

# Numeric precisions a pruned model can be deployed in (see ``search.measuring.quantize``).
PRECISIONS: dict[str, str] = {
    "fp32": "the pruned model as it is, in FP32",
    "int8": "the pruned model statically quantized by ONNX Runtime (QDQ, per-channel INT8 weights)",
}


@dataclass(frozen=True)
class StagePolicy:
    """What to remove in one stage of the network."""

    stream: float = 0.0
    """Fraction of the stage's residual-stream channels to remove (coupled across its blocks)."""
    inner: float = 0.0
    """Fraction of the channels inside each block of the stage to remove."""
    criterion: str = "l1"
    """How to rank channels; one of :data:`CRITERIA`."""

    def __post_init__(self) -> None:
        for name in ("stream", "inner"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} ratio must be in [0, 1), got {value}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; known: {', '.join(CRITERIA)}")


@dataclass(frozen=True)
class Policy:
    """A structured-pruning policy: per-stage ratios and criteria, plus channel rounding."""

    stages: dict[str, StagePolicy] = field(default_factory=dict)
    """Stage name (as in the space file, e.g. ``layer1``) to what to remove there."""
    round_to: int = 8
    """Channels kept per group are rounded up to a multiple of this (odd counts run slower)."""
    seed: int = 0
    """Seed for the random criterion and for the batches the Taylor criterion sees."""
    precision: str = "fp32"
    """How the pruned model runs: one of :data:`PRECISIONS` (``int8`` is quantized after fine-tuning)."""

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")

    @property
    def is_unpruned(self) -> bool:
        return all(s.stream == 0.0 and s.inner == 0.0 for s in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": {
                name: {"stream": s.stream, "inner": s.inner, "criterion": s.criterion}
                for name, s in self.stages.items()
            },
            "round_to": self.round_to,
            "seed": self.seed,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        stages = {name: StagePolicy(**values) for name, values in data["stages"].items()}
        return cls(
            stages=stages,
            round_to=int(data["round_to"]),
            seed=int(data.get("seed", 0)),
            precision=str(data.get("precision", "fp32")),  # studies from before INT8 hold FP32 policies
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))

    def key(self) -> str:
        """A short stable hash of the policy, to spot duplicates."""
        values = self.to_dict()
        if self.precision == "fp32":  # FP32 policies keep the keys they had before precision existed
            del values["precision"]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """A compact one-line summary: ``stage stream%/inner% criterion``, e.g. ``layer1 20/35 l1, ...``.

        A policy in another precision than FP32 ends with it, e.g. ``..., round 8, int8``.
        """
        suffix = "" if self.precision == "fp32" else f", {self.precision}"
        if self.is_unpruned:
            return "unpruned" + suffix
        parts = [f"{name} {s.stream * 100:.0f}/{s.inner * 100:.0f} {s.criterion}" for name, s in self.stages.items()]
        return ", ".join(parts) + f", round {self.round_to}" + suffix

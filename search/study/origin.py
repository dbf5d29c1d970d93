"""Where a trial's policy came from: an enqueued recipe or start-up sample, or the sampler (maybe fitted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["is_enqueued", "origin"]


def is_enqueued(attrs: Mapping[str, Any]) -> bool:
    """Whether the study enqueued this trial's policy (a recipe or a start-up sample) rather than sampling it."""
    return bool(attrs.get("recipe") or attrs.get("start"))


def origin(attrs: Mapping[str, Any]) -> str | None:
    """A short label for a trial's policy ("uniform 0.35 l1", "start-up, near the budget", "fitted to the
    budget, strength 1.41"); None for a policy the sampler proposed and that ran as it was proposed."""
    if "budget_fit" in attrs:
        return f"fitted to the budget, strength {attrs['budget_fit']['strength']:.2f}"
    if attrs.get("start"):
        return f"start-up, {attrs['start']}"
    return attrs.get("recipe") or None

"""Where a trial's policy came from: an enqueued recipe or start-up sample, or the sampler (maybe fitted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ENQUEUED_ATTRS", "LATENCY_AT_CREATION", "is_enqueued", "origin"]

LATENCY_AT_CREATION = "latency_at_creation"
"""User attribute of an enqueued recipe: its latency record as measured when the study chose it."""

ENQUEUED_ATTRS = ("recipe", "start", LATENCY_AT_CREATION)
"""The user attributes a trial is enqueued with; a policy queued again (Ctrl-C, a killed worker) keeps these only."""


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

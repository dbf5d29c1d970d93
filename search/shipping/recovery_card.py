"""The rows of ``card.md`` that say how export recovered accuracy: the pruning steps and feature distillation."""

from __future__ import annotations

from typing import Any

__all__ = ["recovery_rows"]


def recovery_rows(card: dict[str, Any]) -> list[str]:
    """``card.md`` rows for the pruning schedule (several steps) and feature distillation (when on)."""
    rows = []
    schedule = card.get("pruning_schedule")
    if schedule and schedule["prune_steps"] > 1:
        steps = schedule["steps"]
        channels = " → ".join(str(s["total_channels"]) for s in steps)
        epochs = " + ".join(f"{s['epochs']:g}" for s in steps)
        rows.append(
            f"| pruning schedule | {schedule['prune_steps']} steps, channels {schedule['unpruned_total_channels']} → "
            f"{channels} (the last is the trial's), fine-tune epochs {epochs}; "
            "top-1 before fine-tune is after the last step's pruning |"
        )
    distill = card.get("feature_distill")
    if distill and distill.get("weight"):
        stages = ", ".join(f"{stage} ({module})" for stage, module in distill["stages"].items())
        adapted = ", ".join(f"{name} {a[0]}→{a[1]}" for name, a in distill["adapters"].items()) or "none"
        qat = distill.get("qat_steps_without")
        during = f"; the FP32 fine-tune only (the last {qat} steps, QAT, distil logits alone)" if qat else ""
        rows.append(
            f"| feature distillation | weight {distill['weight']:g} on the stage outputs {stages}; "
            f"1x1 adapters (training only, not exported): {adapted}{during} |"
        )
    return rows

"""The one line the search logs for each trial this worker finished."""

from __future__ import annotations

from optuna.trial import FrozenTrial

from search.pruning.policy import Policy
from search.study.origin import is_enqueued, origin

__all__ = ["trial_line"]


def trial_line(t: FrozenTrial) -> str:
    """The log's one line for a finished trial: latency, top-1 (INT8 and FP32 where both), budget, seconds."""
    number = t.number
    attrs = t.user_attrs
    latency = attrs["latency"]
    status = "within budget" if attrs["feasible"] else "over budget, not fine-tuned"
    if not attrs["feasible"] and not is_enqueued(attrs):
        status += ", not counted"
    evaluated = attrs.get("fine_tuned") or Policy.from_dict(attrs["policy"]).is_unpruned
    accuracy = f"top-1 {attrs['accuracy']:.4f}" if evaluated else "top-1 -"
    if attrs.get("fine_tuned"):
        accuracy += f" (before fine-tune {attrs['accuracy_before']:.4f})"
    if attrs.get("precision") == "int8":  # accuracy run in ONNX Runtime; before/after fine-tune are FP32
        accuracy = f"INT8 {accuracy}" if evaluated else "INT8, top-1 -"
        if "accuracy_fp32" in attrs:
            accuracy = accuracy[:-1] + f", FP32 after {attrs['accuracy_fp32']:.4f})"
    label = origin(attrs)
    recipe = f" [{label}]" if label else ""
    took = sum(attrs.get("seconds", {}).values())
    return (
        f"Trial {number}{recipe}: {latency['corrected_ms']:.2f} ms ({latency['ratio']:.0%} of baseline), "
        f"{accuracy}, {status}, {took:.0f} s"
    )

"""What a study found: its rows, its Pareto front, the recommended policy, and a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.policy import Policy

__all__ = ["Row", "pareto_front", "plot_front", "recommended", "rows"]


@dataclass(frozen=True)
class Row:
    """One finished trial, as the reports show it."""

    number: int
    accuracy: float | None
    """Top-1 after the brief fine-tune (the baseline's own for the unpruned policy); None if not evaluated."""
    accuracy_before: float | None
    latency_ms: float
    """Drift-corrected median latency: ratio to the interleaved baseline times the study's baseline."""
    ratio: float
    p90_ms: float
    macs: int
    params: int
    feasible: bool
    recipe: str | None
    policy: Policy

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8`` (the policy's; latency and accuracy were measured in it)."""
        return self.policy.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "accuracy": self.accuracy,
            "accuracy_before": self.accuracy_before,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.ratio,
            "p90_ms": self.p90_ms,
            "macs": self.macs,
            "params": self.params,
            "feasible": self.feasible,
            "recipe": self.recipe,
            "precision": self.precision,
            "policy": self.policy.to_dict(),
        }


def rows(study: optuna.Study) -> list[Row]:
    """Every completed trial of the study, in trial order."""
    result = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        evaluated = a.get("fine_tuned") or Policy.from_dict(a["policy"]).is_unpruned  # unpruned: FP32 or INT8 baseline
        result.append(
            Row(
                number=t.number,
                accuracy=float(t.values[0]) if evaluated else None,
                accuracy_before=a.get("accuracy_before"),
                latency_ms=float(t.values[1]),
                ratio=float(a["latency"]["ratio"]),
                p90_ms=float(a["latency"]["p90_ms"])
                * float(a["latency"]["corrected_ms"])
                / float(a["latency"]["median_ms"]),
                macs=int(a.get("macs", 0)),
                params=int(a.get("params", 0)),
                feasible=bool(a.get("feasible")),
                recipe=a.get("recipe"),
                policy=Policy.from_dict(a["policy"]),
            )
        )
    return result


def pareto_front(all_rows: list[Row], *, feasible_only: bool = True) -> list[Row]:
    """Rows no other row beats on both accuracy and latency, fastest first."""
    candidates = [r for r in all_rows if r.accuracy is not None and (r.feasible or not feasible_only)]
    front = []
    for r in candidates:
        dominated = any(
            o.accuracy >= r.accuracy
            and o.latency_ms <= r.latency_ms  # type: ignore[operator]
            and (o.accuracy > r.accuracy or o.latency_ms < r.latency_ms)  # type: ignore[operator]
            for o in candidates
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.latency_ms)


def recommended(all_rows: list[Row]) -> Row | None:
    """The most accurate policy within the budget (the faster one on a tie)."""
    feasible = [r for r in all_rows if r.feasible and r.accuracy is not None]
    if not feasible:
        return None
    return max(feasible, key=lambda r: (r.accuracy, -r.latency_ms))


LABEL_STEP_POINTS = 9
"""Vertical distance, in points, between stacked labels of points that sit close together."""


def _label_offsets(ax: Any, points: list[tuple[float, float]]) -> list[float]:
    """A vertical text offset (points) per labelled point, so labels of nearby points do not overlap.

    Recipes at the budget often land within a pixel of each other (uniform and global at the
    same latency); each label is stacked above the previous ones it would otherwise cover.
    """
    ax.autoscale_view()
    pixels = ax.transData.transform(points) if points else []
    scale = ax.figure.dpi / 72  # pixels per point
    placed: list[tuple[float, float]] = []  # label anchors in pixels
    offsets = []
    for x, y in pixels:
        dy = 4.0
        while any(abs(x - px) < 120 and abs(y + dy * scale - py) < LABEL_STEP_POINTS * scale for px, py in placed):
            dy += LABEL_STEP_POINTS
        placed.append((x, y + dy * scale))
        offsets.append(dy)
    return offsets


def plot_front(all_rows: list[Row], budget_ms: float, path: Path, *, title: str) -> Path:
    """Accuracy against latency: every trial, infeasible ones grey, the front joined, the budget a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    shown = [r for r in all_rows if r.accuracy is not None]
    infeasible = [r for r in shown if not r.feasible]
    feasible = [r for r in shown if r.feasible]
    ax.scatter(
        [r.latency_ms for r in feasible], [r.accuracy for r in feasible], s=22, color="tab:blue", label="within budget"
    )
    ax.scatter(
        [r.latency_ms for r in infeasible], [r.accuracy for r in infeasible], s=22, color="0.7", label="over budget"
    )
    int8 = [r for r in shown if r.precision == "int8"]
    if int8:
        ax.scatter(
            [r.latency_ms for r in int8],
            [r.accuracy for r in int8],
            s=60,
            marker="^",
            facecolors="none",
            edgecolors="tab:purple",
            zorder=3,  # above the front's line and dots, which would otherwise hide it
            label="INT8 (ONNX Runtime)",
        )
    front = pareto_front(all_rows)
    if front:
        ax.plot(
            [r.latency_ms for r in front],
            [r.accuracy for r in front],
            "-o",
            color="tab:orange",
            ms=4,
            label="Pareto front",
        )
    ax.axvline(budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    labelled = [r for r in shown if r.recipe]
    for r, dy in zip(labelled, _label_offsets(ax, [(r.latency_ms, r.accuracy) for r in labelled]), strict=True):
        ax.annotate(r.recipe, (r.latency_ms, r.accuracy), fontsize=7, xytext=(4, dy), textcoords="offset points")
    best = recommended(all_rows)
    if best is not None:
        ax.scatter(
            [best.latency_ms],
            [best.accuracy],
            s=160,
            facecolors="none",
            edgecolors="tab:green",
            lw=2,
            zorder=4,
            label=f"recommended (trial {best.number})",
        )
    ax.set_xlabel("latency, ms (ONNX Runtime, batch 1, drift-corrected median)")
    ax.set_ylabel("top-1 accuracy (validation)")
    unevaluated = [r for r in all_rows if r.accuracy is None]
    if unevaluated:  # over budget, never fine-tuned: shown on the floor of the plot at their latency
        floor = ax.get_ylim()[0]
        ax.scatter(
            [r.latency_ms for r in unevaluated],
            [floor] * len(unevaluated),
            marker="x",
            s=28,
            color="0.6",
            clip_on=False,
            label="over budget, not fine-tuned",
        )
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

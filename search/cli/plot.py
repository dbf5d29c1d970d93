"""The Pareto plot: accuracy against latency, the budget a line, the recipes labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.study.front import Row, pareto_front, recommended

__all__ = ["LABEL_STEP_POINTS", "plot_front"]


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

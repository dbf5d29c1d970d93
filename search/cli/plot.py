"""The Pareto plot: accuracy against latency, the budget a line, the recipes labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.study.front import Row, pareto_front, recommended

__all__ = ["LABEL_STEP_POINTS", "plot_front"]


LABEL_STEP_POINTS = 9
"""Distance, in points, between the rings of places tried for a label that cannot sit next to its point."""

_GAP = 7.0
"""Points between a point and a label written right next to it (clear of the recommended point's ring)."""

_CLEAR_PX = 6.0
"""A label next to its point must be this many pixels nearer to it than to any other trial's point."""

_Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels
_Segment = tuple[float, float, float, float]  # a leader line, x0, y0, x1, y1 in display pixels


def _candidates() -> list[tuple[float, float, bool]]:
    """Offsets (points) tried for a label, in order: next to its point, then rings further out with a leader line."""
    near = [(_GAP, 0.0), (-_GAP, 0.0), (0.0, _GAP), (0.0, -_GAP)]
    far = []
    for ring in range(2, 8):
        d = ring * LABEL_STEP_POINTS
        far += [(d * 0.7, d * 0.7), (d * 0.7, -d * 0.7), (-d * 0.7, d * 0.7), (-d * 0.7, -d * 0.7), (0, d), (0, -d)]
    return [(dx, dy, False) for dx, dy in near] + [(dx, dy, True) for dx, dy in far]


def _alignment(dx: float, dy: float) -> tuple[str, str]:
    horizontal = "left" if dx > 0 else "right" if dx < 0 else "center"
    return horizontal, "bottom" if dy > 0 else "top" if dy < 0 else "center"


def _box(x: float, y: float, dx: float, dy: float, size: tuple[float, float], scale: float) -> _Box:
    """The pixel box of a label of ``size`` (pixels) written at ``(dx, dy)`` points from the point ``(x, y)``."""
    w, h = size
    ha, va = _alignment(dx, dy)
    x0 = x + dx * scale - {"left": 0.0, "right": w, "center": w / 2}[ha]
    y0 = y + dy * scale - {"bottom": 0.0, "top": h, "center": h / 2}[va]
    return x0, y0, x0 + w, y0 + h


def _distance(box: _Box, x: float, y: float) -> float:
    x0, y0, x1, y1 = box
    return float(((max(x0 - x, 0.0, x - x1)) ** 2 + (max(y0 - y, 0.0, y - y1)) ** 2) ** 0.5)


def _overlaps(a: _Box, b: _Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses(a: _Segment, b: _Segment) -> bool:
    def side(x0: float, y0: float, x1: float, y1: float, x: float, y: float) -> float:
        return (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)

    return side(*a, *b[:2]) * side(*a, *b[2:]) < 0 and side(*b, *a[:2]) * side(*b, *a[2:]) < 0


def _place_labels(ax: Any, labelled: list[Row], dots: list[tuple[float, float]], obstacles: list[_Box]) -> None:
    """Write each recipe's label at its own trial's point: next to it where no other point is as near (the label
    reads as that point's), otherwise further out with a leader line to it; never over a point or another label.

    Recipes at the budget often land within a pixel of each other and of start-up samples (uniform
    and global at the same latency); a label pushed next to another trial's dot reads as that
    trial's, so a label that cannot sit by its own point is joined to it.
    """
    renderer = ax.figure.canvas.get_renderer()
    scale = ax.figure.dpi / 72  # pixels per point
    frame = ax.get_window_extent(renderer)
    pixels = [(float(px), float(py)) for px, py in ax.transData.transform(dots)] if dots else []
    boxes, leaders = list(obstacles), []
    for row in sorted(labelled, key=lambda r: -r.accuracy):  # top down: leader lines of a cluster do not cross
        x, y = (float(v) for v in ax.transData.transform((row.latency_ms, row.accuracy)))
        probe = ax.text(0, 0, row.recipe, fontsize=7)
        extent = probe.get_window_extent(renderer)
        size = (extent.width, extent.height)
        probe.remove()
        others = [(px, py) for px, py in pixels if abs(px - x) > 0.5 or abs(py - y) > 0.5]
        options = _candidates()
        chosen = options[4]  # where nothing is clear: the first ring out, joined to its point
        for dx, dy, leader in options:
            box = _box(x, y, dx, dy, size, scale)
            line = (x, y, x + dx * scale, y + dy * scale)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if not inside or any(_overlaps(box, b) for b in boxes) or any(_crosses(line, s) for s in leaders):
                continue
            nearest_other = min((_distance(box, px, py) for px, py in others), default=float("inf"))
            if nearest_other < 3 * scale or (not leader and nearest_other < _distance(box, x, y) + _CLEAR_PX):
                continue
            chosen = (dx, dy, leader)
            break
        dx, dy, leader = chosen
        boxes.append(_box(x, y, dx, dy, size, scale))
        if leader:
            leaders.append((x, y, x + dx * scale, y + dy * scale))
        ha, va = _alignment(dx, dy)
        ax.annotate(
            row.recipe,
            (row.latency_ms, row.accuracy),
            fontsize=7,
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            arrowprops={"arrowstyle": "-", "color": "0.35", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if leader else None,
        )


def plot_front(all_rows: list[Row], budget_ms: float, path: Path, *, title: str, runtime: str = "ONNX Runtime") -> Path:
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
            label=f"INT8 ({runtime})",
        )
    promoted = [r for r in shown if r.rung > 0]
    if promoted:
        ax.scatter(
            [r.latency_ms for r in promoted],
            [r.accuracy for r in promoted],
            s=70,
            marker="s",
            facecolors="none",
            edgecolors="0.25",
            zorder=3,
            label="promoted: top-1 of its highest rung",
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
    ax.set_xlabel(f"latency, ms ({runtime}, batch 1, drift-corrected median)")
    ax.set_ylabel("top-1 (validation, each trial's highest rung)" if promoted else "top-1 accuracy (validation)")
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
    legend = ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    ax.set_xlim(ax.get_xlim())  # fixed from here on: labels are placed in the pixels of the final layout
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = legend.get_window_extent(renderer)
    labelled = [r for r in shown if r.recipe]
    dots = [(r.latency_ms, r.accuracy) for r in shown]
    _place_labels(ax, labelled, dots, [(frame.x0, frame.y0, frame.x1, frame.y1)])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:  # a folder that cannot be written still closes the figure
        plt.close(fig)
    return path

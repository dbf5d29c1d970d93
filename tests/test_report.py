"""The Pareto plot stays readable: labels of recipes at nearly the same point do not cover each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.report import LABEL_STEP_POINTS, Row, plot_front
from search.space import load_space
from tests.conftest import ROOT

POLICY = load_space(ROOT / "spaces" / "resnet18.toml").unpruned()


def _row(number: int, latency_ms: float, accuracy: float, recipe: str) -> Row:
    return Row(
        number=number,
        accuracy=accuracy,
        accuracy_before=accuracy,
        latency_ms=latency_ms,
        p90_ms=latency_ms,
        ratio=latency_ms / 10,
        macs=1,
        params=1,
        feasible=latency_ms <= 5,
        recipe=recipe,
        policy=POLICY,
    )


def test_labels_of_recipes_at_the_same_point_are_stacked_not_overlapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    rows = [
        _row(0, 10.0, 0.90, "unpruned"),
        _row(1, 3.30, 0.734, "uniform 0.6 l1 at the budget"),
        _row(2, 3.31, 0.733, "global 0.6 l2 at the budget"),
    ]
    captured = {}
    save = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # read the labels' boxes from the figure that is saved
        fig.canvas.draw()
        captured["boxes"] = {t.get_text(): t.get_window_extent() for t in fig.axes[0].texts}
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    path = plot_front(rows, 5.0, tmp_path / "front.png", title="t")
    assert path.stat().st_size > 0
    boxes = captured["boxes"]
    uniform, global_ = boxes["uniform 0.6 l1 at the budget"], boxes["global 0.6 l2 at the budget"]
    assert not uniform.overlaps(global_), "the two recipe labels cover each other"
    assert abs(uniform.y0 - global_.y0) >= LABEL_STEP_POINTS * 0.9

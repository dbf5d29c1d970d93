"""The Pareto plot stays readable: recipe labels at one point do not cover each other, INT8 markers show."""

from __future__ import annotations

import dataclasses
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


def test_an_int8_point_on_the_front_still_shows_its_int8_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recommended point is often unpruned INT8, on the front and ringed: its purple triangle must stay visible."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    int8 = load_space(ROOT / "spaces" / "resnet18.toml").unpruned("int8")
    rows = [
        _row(0, 10.0, 0.90, "unpruned"),
        _row(1, 2.0, 0.80, "uniform 0.5 l1"),
        _row(2, 3.0, 0.85, "global 0.3 l2"),
    ]
    rows.append(dataclasses.replace(_row(3, 4.0, 0.90, "unpruned int8"), policy=int8))
    where = {}
    save = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # the INT8 point's position in the saved image (origin top left)
        fig.canvas.draw()
        x, y = fig.axes[0].transData.transform((4.0, 0.90))
        where["xy"] = (round(x), round(fig.bbox.height - y))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    path = plot_front(rows, 5.0, tmp_path / "front.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    x, y = where["xy"]
    around = pixels[y - 10 : y + 11, x - 10 : x + 11]
    purple = (np.abs(around - (148, 103, 189)).sum(axis=2) < 60).sum()  # matplotlib's tab:purple
    assert purple >= 30, f"the INT8 marker is hidden under the front and the ring ({purple} purple pixels)"

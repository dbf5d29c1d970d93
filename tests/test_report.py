"""The Pareto plot stays readable: recipe labels at one point do not cover each other, INT8 markers show."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from search.cli.plot import LABEL_STEP_POINTS, plot_front
from search.pruning.space import load_space
from search.study.front import Row
from tests.conftest import ROOT

SPACE = load_space(ROOT / "spaces" / "resnet18.toml")
POLICY = SPACE.unpruned()


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


def _plot_and_read(rows: list[Row], path: Path, monkeypatch: pytest.MonkeyPatch, read: Callable[[Any], Any]) -> Any:
    """Plot ``rows`` to ``path`` and return ``read(figure)``, taken from the drawn figure just before it is saved."""
    import matplotlib.pyplot as plt

    captured = []
    save = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        fig.canvas.draw()
        captured.append(read(fig))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot_front(rows, 5.0, path, title="t")
    assert path.stat().st_size > 0
    return captured[0]


def test_labels_of_recipes_at_the_same_point_are_stacked_not_overlapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        _row(0, 10.0, 0.90, "unpruned"),
        _row(1, 3.30, 0.734, "uniform 0.6 l1 at the budget"),
        _row(2, 3.31, 0.733, "global 0.6 l2 at the budget"),
    ]
    boxes = _plot_and_read(
        rows,
        tmp_path / "front.png",
        monkeypatch,
        lambda fig: {t.get_text(): t.get_window_extent() for t in fig.axes[0].texts},
    )
    uniform, global_ = boxes["uniform 0.6 l1 at the budget"], boxes["global 0.6 l2 at the budget"]
    assert not uniform.overlaps(global_), "the two recipe labels cover each other"
    assert abs(uniform.y0 - global_.y0) >= LABEL_STEP_POINTS * 0.9


def test_an_int8_point_on_the_front_still_shows_its_int8_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recommended point is often unpruned INT8, on the front and ringed: its purple triangle must stay visible."""
    import numpy as np
    from PIL import Image

    rows = [
        _row(0, 10.0, 0.90, "unpruned"),
        _row(1, 2.0, 0.80, "uniform 0.5 l1"),
        _row(2, 3.0, 0.85, "global 0.3 l2"),
        dataclasses.replace(_row(3, 4.0, 0.90, "unpruned int8"), policy=SPACE.unpruned("int8")),
    ]
    path = tmp_path / "front.png"

    def int8_point(fig):  # the INT8 point's position in the saved image (origin top left)
        x, y = fig.axes[0].transData.transform((4.0, 0.90))
        return round(x), round(fig.bbox.height - y)

    x, y = _plot_and_read(rows, path, monkeypatch, int8_point)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    around = pixels[y - 10 : y + 11, x - 10 : x + 11]
    purple = (np.abs(around - (148, 103, 189)).sum(axis=2) < 60).sum()  # matplotlib's tab:purple
    assert purple >= 30, f"the INT8 marker is hidden under the front and the ring ({purple} purple pixels)"

"""The Pareto plot stays readable: recipe labels at one point do not cover each other and each reads as its own
trial's, INT8 markers show."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from search.cli.plot import plot_front
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


def _plot_and_read(
    rows: list[Row], path: Path, monkeypatch: pytest.MonkeyPatch, read: Callable[[Any], Any], budget_ms: float = 5.0
) -> Any:
    """Plot ``rows`` to ``path`` and return ``read(figure)``, taken from the drawn figure just before it is saved."""
    import matplotlib.pyplot as plt

    captured = []
    save = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        fig.canvas.draw()
        captured.append(read(fig))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot_front(rows, budget_ms, path, title="t")
    assert path.stat().st_size > 0
    return captured[0]


def test_labels_of_recipes_at_the_same_point_do_not_cover_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.text import Text

    rows = [
        _row(0, 10.0, 0.90, "unpruned"),
        _row(1, 3.30, 0.734, "uniform 0.6 l1 at the budget"),
        _row(2, 3.31, 0.733, "global 0.6 l2 at the budget"),
    ]
    boxes = _plot_and_read(
        rows,
        tmp_path / "front.png",
        monkeypatch,
        lambda fig: {t.get_text(): Text.get_window_extent(t) for t in fig.axes[0].texts},  # the text, not its line
    )
    uniform, global_ = boxes["uniform 0.6 l1 at the budget"], boxes["global 0.6 l2 at the budget"]
    assert not uniform.overlaps(global_), "the two recipe labels cover each other"


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


def test_each_recipe_label_is_attached_to_its_own_trials_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipes at the budget sit within a pixel of each other and of start-up samples: each label must read as
    its own trial's (nearest to its point, or joined to it by a leader line), never as a neighbour's."""
    from matplotlib.text import Annotation, Text

    rows = [
        _row(0, 40.1, 0.975, "unpruned"),
        _row(1, 35.0, 0.968, "uniform 0.2 l1"),
        _row(2, 29.95, 0.955, "uniform 0.35 l1 at the budget"),
        _row(3, 20.0, 0.90, "uniform 0.5 l1"),
        _row(4, 29.97, 0.957, "global 0.3 l2 at the budget"),
        dataclasses.replace(_row(5, 29.9, 0.9615, ""), recipe=None),  # a start-up sample just above them
        dataclasses.replace(_row(6, 28.0, 0.95, ""), recipe=None),
        _row(7, 24.9, 0.963, "unpruned int8"),
    ]
    rows = [dataclasses.replace(r, feasible=r.latency_ms <= 30) for r in rows]

    def read(fig):
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        labels = {
            t.get_text(): (t.xy, Text.get_window_extent(t, renderer), t.arrow_patch is not None)
            for t in ax.texts
            if isinstance(t, Annotation)
        }
        return labels, {r.number: ax.transData.transform((r.latency_ms, r.accuracy)) for r in rows}

    labels, dots = _plot_and_read(rows, tmp_path / "front.png", monkeypatch, read, budget_ms=30.0)

    def distance(box, point) -> float:
        x, y = point
        return float(np.hypot(max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1)))

    for r in (r for r in rows if r.recipe):
        xy, box, leader = labels[r.recipe]
        assert xy == (r.latency_ms, r.accuracy), f"{r.recipe!r} points at another place than its trial's"
        own = distance(box, dots[r.number])
        others = {n: distance(box, p) for n, p in dots.items() if n != r.number}
        assert min(others.values()) > 2, f"{r.recipe!r} is written over another trial's dot"
        nearest = min(others, key=others.__getitem__)
        assert leader or own < others[nearest], f"{r.recipe!r} sits by trial {nearest}'s dot, not its own, unjoined"

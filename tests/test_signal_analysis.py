"""The signal benchmark's arithmetic (benchmarks/signal_lib/analysis.py): what its table reports per fidelity."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks.signal_lib.analysis import analyse, best_kept, regret
from benchmarks.signal_lib.plan import Plan
from search.study.uncertainty import pack_correct


def test_regret_is_what_picking_the_fidelitys_best_loses() -> None:
    truth = [0.80, 0.78, 0.75]
    assert regret([0.5, 0.6, 0.4], truth) == pytest.approx(0.02)  # picks the second
    assert regret([0.7, 0.6, 0.4], truth) == 0.0
    assert regret([0.7, 0.7, 0.4], [0.78, 0.80, 0.75]) == pytest.approx(0.02)  # a tie counts as the worse pick


def test_best_kept_in_the_top_third() -> None:
    truth = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert best_kept([0.5, 0.9, 0.1, 0.2, 0.3, 0.4], truth)  # second of six: in the top two
    assert not best_kept([0.1, 0.9, 0.8, 0.2, 0.3, 0.4], truth)


def _record(correct: np.ndarray) -> dict[str, float | int | str]:
    bits = correct.tolist()
    record = {"images": len(bits), "top1": float(correct.mean()), "per_image": pack_correct(bits)}
    return {**record, "train_seconds": 1.0, "bn_seconds": 0.0, "eval_seconds": 0.5, "train_images": 64}


def test_a_fidelity_in_the_references_order_has_tau_one_and_no_regret() -> None:
    args = argparse.Namespace(quick=True, lr=0.01, second_lr=0.05)
    plan = Plan.of(args, "m")
    rng = np.random.default_rng(0)
    accuracy = {"c0": 0.5, "c1": 0.6, "c2": 0.7, "c3": 0.8}
    ids = list(accuracy)
    refs = {i: [_record(rng.random(300) < a), _record(rng.random(300) < a)] for i, a in accuracy.items()}
    val = {i: _record(np.arange(300) < 300 * (a - 0.3)) for i, a in accuracy.items()}  # the same order, exactly
    budget = {"candidates": [{"id": i} for i in ids]}
    got = analyse(plan, budget, {"plain 2": val}, refs)
    (row,) = got["fidelities"]
    assert row["tau_all_val"] == pytest.approx(1.0)
    assert row["regret_all_val"] == 0.0
    assert got["noise"]["tau_between_seeds"] == pytest.approx(1.0)  # 10 pp apart on 300 images: the same order
    small, large = got["noise"]["subsets"]
    assert small["sd_pp_mean"] > large["sd_pp_mean"]  # fewer images read, a wider spread


def test_one_candidate_trained_on_a_busy_machine_does_not_move_a_fidelitys_cost() -> None:
    args = argparse.Namespace(quick=True, lr=0.01, second_lr=0.05)
    plan = Plan.of(args, "m")
    rng = np.random.default_rng(0)
    ids = ["c0", "c1", "c2", "c3"]
    refs = {i: [_record(rng.random(300) < 0.7), _record(rng.random(300) < 0.7)] for i in ids}
    val = {i: _record(rng.random(300) < 0.7) for i in ids}
    val["c3"] = {**val["c3"], "train_seconds": 2291.0}  # paused, or sharing the cores, while it trained
    (row,) = analyse(plan, {"candidates": [{"id": i} for i in ids]}, {"plain 2": val}, refs)["fidelities"]
    assert row["rung_seconds"] == pytest.approx(1.5) and row["cumulative_seconds"] == pytest.approx(1.5)

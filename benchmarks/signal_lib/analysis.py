"""From the cached scores to the numbers the section reports: per fidelity Kendall τ against the reference,
the regret of picking its best, its cost; and the noise floor (reference seeds, validation subsets)."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from benchmarks.signal_lib.plan import Plan
from search.study.uncertainty import unpack_correct

__all__ = ["analyse", "subset_indices"]


def subset_indices(images: int, size: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of ``size`` of ``images`` indices (the search reads such a subset of val)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(images, size=min(size, images), replace=False))


def correctness(record: dict[str, Any]) -> np.ndarray:
    return np.array(unpack_correct(record["per_image"], record["images"]), dtype=bool)


def tau(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(kendalltau(a, b).statistic)


def regret(scores: list[float], truth: list[float]) -> float:
    """Reference top-1 of the truly best candidate minus that of the one the scores pick (ties: the worse one)."""
    best = max(scores)
    picked = min(t for s, t in zip(scores, truth, strict=True) if s == best)
    return max(truth) - picked


def best_kept(scores: list[float], truth: list[float], keep: float = 1 / 3) -> bool:
    """Whether the truly best candidate is among the top ``keep`` by ``scores`` (what a promotion keeps)."""
    kept = max(1, round(keep * len(scores)))
    order = sorted(range(len(scores)), key=lambda k: -scores[k])[:kept]
    return truth.index(max(truth)) in order


def analyse(
    plan: Plan, budget: dict[str, Any], scores: dict[str, dict[str, Any]], refs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """``scores[fidelity][candidate id]`` and ``refs[candidate id]`` (one per seed) into the budget's numbers."""
    ids = [c["id"] for c in budget["candidates"] if c["id"] in refs and len(refs[c["id"]]) == len(plan.seeds)]
    truth = [statistics.fmean(r["top1"] for r in refs[i]) for i in ids]
    result: dict[str, Any] = {"candidates": len(ids), "fidelities": []}
    for fidelity, by_id in scores.items():
        have = [i for i in ids if i in by_id]
        if len(have) < 2:
            continue
        full = [by_id[i]["top1"] for i in have]
        images = by_id[have[0]]["images"]
        subset = subset_indices(images, plan.search_images)
        read = [float(correctness(by_id[i])[subset].mean()) for i in have]
        ref = [truth[ids.index(i)] for i in have]
        cumulative = [_cumulative(scores, fidelity, i) for i in have]
        result["fidelities"].append(
            {
                "fidelity": fidelity,
                "candidates": len(have),
                "tau_search_images": tau(read, ref),
                "tau_all_val": tau(full, ref),
                "regret_search_images": regret(read, ref),
                "regret_all_val": regret(full, ref),
                "best_in_top_third": best_kept(read, ref),
                "val_images": images,
                # Medians: a candidate trained while the shared machine was busy (or the run paused) must not
                # move a fidelity's cost; the work itself is the same for every candidate (train_images).
                "rung_seconds": statistics.median(_own(by_id[i]) for i in have),
                "cumulative_seconds": statistics.median(cumulative),
                "cumulative_train_images": statistics.fmean(
                    _cumulative(scores, fidelity, i, "train_images") for i in have
                ),
            }
        )
    result["noise"] = noise(plan, ids, truth, refs)
    result["reference"] = {
        i: {"top1": [r["top1"] for r in refs[i]], "mean": t, "seconds": statistics.median(_own(r) for r in refs[i])}
        for i, t in zip(ids, truth, strict=True)
    }
    return result


def _own(record: dict[str, Any]) -> float:
    return record["train_seconds"] + record["bn_seconds"] + record["eval_seconds"]


def _cumulative(scores: dict[str, dict[str, Any]], fidelity: str, cid: str, what: str = "seconds") -> float:
    """What reaching ``fidelity`` cost a candidate along its chain: every earlier rung of the chain and this one.

    The distilled and second-lr chains start at their own first rung (BatchNorm recalibrated there)."""
    chain, steps = fidelity.rsplit(" ", 1)
    total = 0.0
    for other, by_id in scores.items():
        c, s = other.rsplit(" ", 1)
        if c == chain and int(s) <= int(steps) and cid in by_id:
            total += _own(by_id[cid]) if what == "seconds" else by_id[cid][what]
    return total


def noise(plan: Plan, ids: list[str], truth: list[float], refs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """τ between the reference seeds, their spread, and what reading n images instead of all the test images gives:
    the standard deviation of one candidate's top-1 (bootstrap) and τ of the ranking the same n images give against
    the ranking on all of them (paired: every candidate read on the same draw)."""
    out: dict[str, Any] = {}
    if len(plan.seeds) >= 2 and len(ids) >= 2:
        first = [refs[i][0]["top1"] for i in ids]
        second = [refs[i][1]["top1"] for i in ids]
        out["tau_between_seeds"] = tau(first, second)
        out["seed_spread_mean"] = statistics.fmean(abs(a - b) for a, b in zip(first, second, strict=True))
        out["seed_spread_max"] = max(abs(a - b) for a, b in zip(first, second, strict=True))
    if not ids:
        return out
    records = np.stack([correctness(refs[i][0]) for i in ids])  # the first seed, candidates x test images
    full = records.mean(axis=1)
    rng = np.random.default_rng(0)
    out["subsets"] = []
    for n in plan.subsets:
        sds, taus = [], []
        draws = [rng.integers(0, records.shape[1], size=n) for _ in range(plan.bootstrap)]
        reads = np.stack([records[:, d].mean(axis=1) for d in draws])  # draws x candidates
        sds = reads.std(axis=0, ddof=1)
        for row in reads:
            t = tau(list(row), list(full))
            if t is not None:
                taus.append(t)
        out["subsets"].append(
            {
                "images": n,
                "sd_pp_mean": float(100 * sds.mean()),
                "tau_vs_all_mean": statistics.fmean(taus) if taus else None,
                "tau_vs_all_p10": float(np.percentile(taus, 10)) if taus else None,
            }
        )
    out["test_images"] = int(records.shape[1])
    out["true_spread_pp"] = float(100 * (max(truth) - min(truth))) if truth else None
    return out

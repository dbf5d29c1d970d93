"""Benchmark: how well the latency-aware tables estimate a trial's measured latency (no measuring, seconds).

The start-up samples near the budget are measured only where the tables' estimate, scaled by how far the estimate
of their anchor (a recipe at the budget) was from its measurement, lands near the band they must fall in
(:func:`search.pruning.near_budget.near_budget`). This reads committed studies: for every trial with a measured
latency, the tables' estimate (:func:`search.pruning.latency_aware.estimated_fraction`) against the drift-corrected
measurement, raw and scaled by the study's latency-aware recipe (the anchor whose estimate the tables made).

    python benchmarks/estimate_check.py      # writes benchmarks/estimate_check.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.models.build import build_model
from search.pruning.auto_space import space_for
from search.pruning.latency_aware import SensitivityTable, estimated_fraction
from search.pruning.near_budget import ESTIMATE_MARGIN, NEAR_BUDGET_FLOOR, estimate_scale
from search.pruning.policy import Policy

HERE = Path(__file__).resolve().parent
STUDIES = [
    *sorted((HERE / "promotion_rule" / "studies").glob("*.db")),
    *sorted((HERE / "equal_compute" / "studies").glob("*.db")),
]
OUT = HERE / "estimate_check.json"
MARGINS = (0.05, ESTIMATE_MARGIN, 0.15, 0.2)


def check(db: Path) -> dict | None:
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    attrs = study.user_attrs
    if "latency_aware" not in attrs:
        return None
    table = SensitivityTable.from_dict(attrs["latency_aware"])
    config = attrs["config"]
    size = int(config.get("input_size") or 32)
    model = build_model(config["model"], 10)
    space = space_for(config["model"], None, 10, torch.zeros(1, 3, size, size), model=model)
    baseline_ms = float(attrs["baseline_latency_ms"])
    points = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        if "policy" not in a or not t.values or a.get("precision", "fp32") != "fp32":
            continue
        policy = Policy.from_dict(a["policy"]) if isinstance(a["policy"], dict) else Policy.from_json(a["policy"])
        if policy.is_unpruned:
            continue
        points.append(
            {
                "trial": t.number,
                "recipe": a.get("recipe") or a.get("start") or "sampled",
                "measured": round(float(t.values[1]) / baseline_ms, 4),
                "estimated": round(estimated_fraction(table, space, policy), 4),
            }
        )
    anchors = [p for p in points if str(p["recipe"]).endswith("at the budget")]
    measured = {p["trial"]: p["measured"] for p in points}
    estimates = {p["trial"]: p["estimated"] for p in points}
    scale = estimate_scale(
        [SimpleNamespace(number=a["trial"], precision="fp32") for a in anchors],  # FP32 trials only, as read
        lambda a: measured[a.number],
        lambda a: estimates[a.number],
    ).get("fp32")  # the product's scale, over the anchors' numbers
    fraction = float(attrs["budget_ms"]) / baseline_ms
    band = (NEAR_BUDGET_FLOOR * fraction, fraction)
    others = [p for p in points if p not in anchors and 0.5 * fraction <= p["measured"] <= 1.5 * fraction]
    inside = [p for p in others if band[0] <= p["measured"] <= band[1]]
    outside = [p for p in others if p not in inside]
    margins = {}
    for margin in MARGINS:
        low, high = band[0] * (1 - margin), band[1] * (1 + margin)

        def kept(p: dict, low: float = low, high: float = high) -> bool:
            return scale is not None and low <= p["estimated"] * scale <= high

        margins[f"{margin:g}"] = {
            "in_band_kept": f"{sum(kept(p) for p in inside)} of {len(inside)}",
            "out_of_band_spared": f"{sum(not kept(p) for p in outside)} of {len(outside)}",
        }
    errors = [p["measured"] / (p["estimated"] * scale) - 1 for p in others] if scale else []
    return {
        "study": study.study_name,
        "budget_fraction": round(fraction, 4),
        "trials": len(points),
        "anchor_scales": [round(a["measured"] / a["estimated"], 3) for a in anchors],
        "scale": None if scale is None else round(scale, 3),
        "relative_error_near_budget": {
            "mean": round(statistics.mean(errors), 3) if errors else None,
            "sd": round(statistics.pstdev(errors), 3) if errors else None,
        },
        "margins": margins,
        "points": points,
    }


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = [r for r in (check(db) for db in STUDIES) if r]
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(
        "| study | anchors' measured / estimated | scale (median) | error near the budget (mean, sd) | "
        + " | ".join(f"margin {m}: in band kept, out spared" for m in results[0]["margins"])
        + " |"
    )
    print("|---" * (4 + len(results[0]["margins"])) + "|")
    for r in results:
        err = r["relative_error_near_budget"]
        cells = " | ".join(f"{m['in_band_kept']}, {m['out_of_band_spared']}" for m in r["margins"].values())
        print(
            f"| {r['study']} | {', '.join(f'{x:.2f}' for x in r['anchor_scales'])} | {r['scale']} | "
            f"{err['mean']:+.3f}, {err['sd']:.3f} | {cells} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

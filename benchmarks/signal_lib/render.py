"""The "Signal" section of BENCHMARKS.md, and the rungs the numbers choose (with the reasons, from the numbers)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from benchmarks.allocation import cpu_label

__all__ = ["choose_rungs", "render"]

TARGET_TAU = 0.6
"""Issue #25: the signal the recommendation is chosen on should reach this τ against the reference at 25%."""


def _f(value: float | None, spec: str = "+.2f") -> str:
    return "" if value is None else format(value, spec)


def _pp(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def choose_rungs(result: dict[str, Any]) -> dict[str, Any]:
    """The screening rung, the final rung, and a middle one, by rules applied to every budget's numbers.

    * final: the cheapest plain-chain fidelity whose τ (all validation images) reaches :data:`TARGET_TAU` at
      every budget; if none does, the one with the highest lowest τ;
    * screen: the cheapest fidelity whose top third (on the search's validation subset) keeps the
      reference's best candidate at every budget, and is cheaper than the final rung;
    * middle: where the final rung costs more than nine times the screen, the plain fidelity between them
      with the highest lowest τ.
    """
    budgets = result["budgets"]
    plain: dict[str, list[dict[str, Any]]] = {}
    for b in budgets:
        for f in b["analysis"]["fidelities"]:
            if f["fidelity"].startswith("plain "):
                plain.setdefault(f["fidelity"], []).append(f)
    complete = {k: v for k, v in plain.items() if len(v) == len(budgets)}
    if not complete:
        return {}

    def cost(k: str) -> float:
        return max(f["cumulative_seconds"] for f in complete[k])

    def worst_tau(k: str) -> float:
        return min((f["tau_all_val"] if f["tau_all_val"] is not None else -1.0) for f in complete[k])

    order = sorted(complete, key=cost)
    reaching = [k for k in order if worst_tau(k) >= TARGET_TAU]
    final = reaching[0] if reaching else max(order, key=worst_tau)
    keeps = [k for k in order if all(f["best_in_top_third"] for f in complete[k]) and cost(k) < cost(final)]
    screen = keeps[0] if keeps else None
    middle = None
    if screen is not None and cost(final) > 9 * cost(screen):
        between = [k for k in order if cost(screen) < cost(k) < cost(final)]
        middle = max(between, key=worst_tau) if between else None
    return {
        "final": final,
        "final_reaches_target": bool(reaching),
        "screen": screen,
        "middle": middle,
        "cost": {k: cost(k) for k in order},
        "worst_tau": {k: worst_tau(k) for k in order},
    }


def _label(result: dict[str, Any], fidelity: str) -> str:
    return result["labels"].get(fidelity, fidelity)


def why(result: dict[str, Any], rungs: dict[str, Any]) -> list[str]:
    if not rungs:
        return ["Not enough fidelities finished at every budget to choose rungs."]
    name = lambda k: _label(result, k)  # noqa: E731
    lines = []
    final = rungs["final"]
    if rungs["final_reaches_target"]:
        lines.append(
            f"The last rung is **{name(final)}**: the cheapest fidelity whose τ against the reference reaches "
            f"{TARGET_TAU} at every budget (lowest {rungs['worst_tau'][final]:+.2f}, "
            f"{rungs['cost'][final]:.0f} s a candidate)."
        )
    else:
        lines.append(
            f"No fidelity reaches τ {TARGET_TAU} at every budget; the last rung is the one with the highest lowest τ, "
            f"**{name(final)}** ({rungs['worst_tau'][final]:+.2f}, {rungs['cost'][final]:.0f} s a candidate)."
        )
    screen = rungs["screen"]
    if screen:
        lines.append(
            f"Every trial is screened at **{name(screen)}** ({rungs['cost'][screen]:.0f} s): its top third held the "
            f"reference's best candidate at every budget, so promoting a third loses no winner there "
            f"(its τ, lowest over budgets: {rungs['worst_tau'][screen]:+.2f})."
        )
    else:
        lines.append(
            "No fidelity cheaper than the last rung kept the reference's best in its top third at every budget."
        )
    if rungs["middle"]:
        m = rungs["middle"]
        lines.append(
            f"Between them, **{name(m)}** ({rungs['cost'][m]:.0f} s, τ {rungs['worst_tau'][m]:+.2f}), since the last "
            "rung costs more than nine screens."
        )
    for b in result["budgets"]:
        by = {f["fidelity"]: f for f in b["analysis"]["fidelities"]}
        notes = []
        for steps in (30, 100):
            base = by.get(f"plain {steps}")
            for variant in ("distill", "lr"):
                other = by.get(f"{variant} {steps}")
                if base and other and base["tau_all_val"] is not None and other["tau_all_val"] is not None:
                    notes.append(
                        f"{name(other['fidelity'])} τ {other['tau_all_val']:+.2f} vs {base['tau_all_val']:+.2f}"
                    )
        gains = [
            f["tau_all_val"] - f["tau_search_images"]
            for f in by.values()
            if f["tau_all_val"] is not None and f["tau_search_images"] is not None
        ]
        if gains:
            notes.append(
                f"reading all {by[next(iter(by))]['val_images']} validation images instead of "
                f"{result['plan']['search_images']} moved τ by {sum(gains) / len(gains):+.2f} on average"
            )
        if notes:
            lines.append(f"At {100 * b['fraction']:g}%: " + "; ".join(notes) + ".")
    return [" ".join(lines)]


def render(result: dict[str, Any]) -> str:
    plan, hw = result["plan"], result["hardware"]
    base = result.get("baseline") or {}
    lines = [
        f"`python benchmarks/signal_fidelity.py` on {result['date']}, commit `{result['git_revision']}`, {cpu_label(hw)}; "
        f"this run {result['seconds'] / 60:.0f} min ({len(result['reused'])} results reused from earlier runs), "
        f"the cached pieces took {result['compute_minutes']:.0f} min in all. {plan['model']} baseline "
        f"`{result['weights']}`"
        + (f" (test top-1 {_pp(base.get('test_top1'))}%)" if base.get("test_top1") else "")
        + ". "
        f"Fidelities: brief fine-tunes of batch {plan['batch']}, lr {plan['lr']:g} unless named, each rung continued "
        "from the weights of the rung before it with a schedule of its own (as promotion would continue a trial), "
        f"seed {plan['seeds'][0]}; read on the validation images. Reference: {plan['reference_epochs']:g} epochs of "
        f"batch {plan['reference_batch']}, lr {plan['reference_lr']:g}, distillation {plan['reference_distill']:g}, "
        f"from the pruned model, seeds {', '.join(map(str, plan['seeds']))}, mean test top-1 over the seeds "
        f"({result['test_images']} test images). τ: Kendall's τ against the reference; regret: reference top-1 of the "
        "truly best candidate minus that of the fidelity's pick; cost: seconds a candidate spent to reach the "
        "fidelity (its chain's earlier rungs included, reads included; the median over the candidates, so that one "
        "trained while the shared machine was busy does not move it).",
        "",
    ]
    for b in result["budgets"]:
        a = b["analysis"]
        sources = Counter(c["source"] for c in b["candidates"])
        lines += [
            f"### {plan['model']} at {100 * b['fraction']:g}% ({b['budget_ms']:.3f} ms of {b['baseline_ms']:.3f})",
            "",
            f"{a['candidates']} candidates fitted to the budget ("
            + ", ".join(f"{n} {s}" for s, n in sorted(sources.items()))
            + (f"; recipes and search trials from `{b['from_study']}`" if b.get("from_study") else "")
            + f"); the reference's top-1 ranges over {_f(a['noise'].get('true_spread_pp'), '.2f')} pp.",
            "",
            f"| fidelity | cost s | images trained | τ ({plan['search_images']} val) | τ (all val) "
            f"| regret pp ({plan['search_images']} val) | regret pp (all val) | best in top third |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in a["fidelities"]:
            lines.append(
                f"| {_label(result, f['fidelity'])} | {f['cumulative_seconds']:.0f} | {f['cumulative_train_images']:.0f} "
                f"| {_f(f['tau_search_images'])} | {_f(f['tau_all_val'])} | {_pp(f['regret_search_images'])} "
                f"| {_pp(f['regret_all_val'])} | {'yes' if f['best_in_top_third'] else 'no'} |"
            )
        n = a["noise"]
        lines += [
            "",
            f"Noise floor: τ between the two reference seeds {_f(n.get('tau_between_seeds'))}; their top-1 differs by "
            f"{_pp(n.get('seed_spread_mean'))} pp on average (at most {_pp(n.get('seed_spread_max'))}). "
            + " ".join(
                f"Reading {s['images']} images (bootstrap from the {n['test_images']} test images of seed "
                f"{plan['seeds'][0]}): one candidate's top-1 varies by ±{s['sd_pp_mean']:.2f} pp (sd), and the "
                f"ranking it gives has τ {_f(s['tau_vs_all_mean'])} against all of them (10th percentile "
                f"{_f(s['tau_vs_all_p10'])})."
                for s in n.get("subsets", [])
            ),
            "",
        ]
    lines += ["### Rungs chosen and why", "", *why(result, result.get("rungs") or {}), ""]
    return "\n".join(lines)

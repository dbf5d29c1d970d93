"""Putting a study's recipes in its queue: labelled, with the latency record that chose each, those known to meet
the budget first."""

from __future__ import annotations

from typing import Any

import optuna

from search.pruning.recipes import Recipe
from search.pruning.space import SearchSpace
from search.study.origin import LATENCY_AT_CREATION

__all__ = ["enqueue_recipes", "known_within_first"]


def known_within_first(recipes: list[Recipe], budget_ms: float) -> list[Recipe]:
    """The recipes measured within the budget when they were chosen first, then the rest in their order.

    The unpruned model and the fixed recipes are often over the budget and count towards ``--trials``:
    run first, they used up a short search, which then ended with no policy within the budget."""
    within = [r for r in recipes if r.label and r.latency is not None and r.latency["corrected_ms"] <= budget_ms]
    return within + [r for r in recipes if not any(r is w for w in within)]


def enqueue_recipes(
    study: optuna.Study, space: SearchSpace, recipes: list[Recipe], budget_ms: float, chosen_at: str | None = None
) -> None:
    """Enqueue each recipe, labelled, with the latency record that chose it (its trial reuses it, saying where it
    was measured: ``chosen_at``, else "study creation"); those known to meet the budget first
    (:func:`known_within_first`)."""
    for recipe in known_within_first(recipes, budget_ms):
        attrs: dict[str, Any] = {"recipe": recipe.label} if recipe.label else {"start": "near the budget"}
        if recipe.latency is not None:
            attrs[LATENCY_AT_CREATION] = {**recipe.latency, **({"chosen_at": chosen_at} if chosen_at else {})}
        study.enqueue_trial(space.params_for(recipe.policy), user_attrs=attrs, skip_if_exists=True)

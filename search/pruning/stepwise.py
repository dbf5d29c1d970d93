"""Iterative pruning: reach a pruned architecture in K steps instead of one.

One-shot pruning removes every channel a policy asks for at once, from the baseline's weights.
Iteratively, each step removes part of them (chosen again by the policy's criterion on the
weights the previous steps' fine-tunes left), so the network can adapt in between. The goal is
fixed by the trial that was timed: every layer ends with exactly the channels it has in the
trial's model, so the latency the search measured stays true. Step ``k`` of ``K`` keeps, per
layer, the unpruned count minus ``k/K`` of the channels the trial removes there (rounded half
up), so the last step lands on the trial's counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from search.errors import UsageError
from search.pruning.channels import (
    _accumulate_gradients,
    _importance,
    _stage_groups,
    _uses,
    layer_channels,
)
from search.pruning.graph import build_graph
from search.pruning.groups import grouped_convs
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace

__all__ = ["check_prune_steps", "max_prune_steps", "prune_towards", "step_targets"]


def _removed(original: dict[str, int], final: dict[str, int]) -> dict[str, int]:
    """Channels each layer loses from ``original`` to ``final`` (layers that lose none left out)."""
    missing = sorted(set(final) - set(original))
    if missing:
        raise ValueError(f"layers {missing[:3]} of the pruned model are not in the unpruned one")
    return {name: original[name] - final[name] for name in final if original[name] > final[name]}


def max_prune_steps(original: dict[str, int], final: dict[str, int]) -> int:
    """The most steps in which every pruned layer still loses channels at every step (0: nothing is pruned)."""
    removed = _removed(original, final)
    return min(removed.values()) if removed else 0


def check_prune_steps(steps: int, original: dict[str, int], final: dict[str, int]) -> None:
    """Refuse ``steps`` outside 1..:func:`max_prune_steps` with a one-line error."""
    if steps < 1:
        raise UsageError(f"--prune-steps must be at least 1, got {steps}")
    removed = _removed(original, final)
    if steps > 1 and not removed:
        raise UsageError(f"--prune-steps {steps}: the policy prunes nothing; use --prune-steps 1")
    if steps > 1:
        layer = min(removed, key=lambda n: removed[n])
        if steps > removed[layer]:
            raise UsageError(
                f"--prune-steps {steps} is more than the channels allow: layer {layer} loses only "
                f"{removed[layer]} channels, so some step would remove none; use at most --prune-steps {removed[layer]}"
            )


def step_targets(original: dict[str, int], final: dict[str, int], steps: int) -> list[dict[str, int]]:
    """Channels per layer after each of ``steps`` steps; the last equals ``final`` exactly."""
    removed = _removed(original, final)
    targets = []
    for k in range(1, steps + 1):
        targets.append({name: original[name] - math.floor(r * k / steps + 0.5) for name, r in removed.items()})
    return targets


def prune_towards(
    model: nn.Module,
    target: dict[str, int],
    policy: Policy,
    space: SearchSpace,
    example_input: torch.Tensor,
    *,
    taylor_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[Any]:
    """Remove channels from ``model`` in place until each layer in ``target`` has that many outputs.

    Channels go by the criterion of the policy's stage of each group of coupled channels, scored
    on the model's current weights. Returns torch-pruning's history of this step (to replay it).
    """
    if grouped_convs(model):
        raise UsageError(
            "iterative pruning does not handle grouped convolutions (ResNeXt, RegNet) yet; use --prune-steps 1"
        )
    model.eval()
    graph = build_graph(model, example_input)
    if _uses(policy, "taylor"):
        _accumulate_gradients(model, taylor_batches)
    generator = torch.Generator().manual_seed(policy.seed)
    names = {module: name for name, module in model.named_modules()}
    for stage, _kind, group in _stage_groups(model, graph, space):
        root = names.get(group[0].dep.target.module, "")
        current = len(group[0].idxs)
        want = target.get(root, current)
        if want >= current:
            continue
        choice = policy.stages.get(stage.name)
        criterion = choice.criterion if choice is not None else "l1"
        scores = _importance(criterion, group, current, generator)
        drop = torch.argsort(scores)[: current - want].tolist()
        group.prune(idxs=sorted(drop), record_history=False)  # the inner group records the history
    model.zero_grad(set_to_none=True)
    reached = layer_channels(model)
    wrong = {n: (reached.get(n), c) for n, c in target.items() if reached.get(n) != c}
    if wrong:
        name, (got, want) = next(iter(wrong.items()))
        raise RuntimeError(f"iterative pruning left layer {name} with {got} channels, not {want}")
    return [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in graph.pruning_history()]

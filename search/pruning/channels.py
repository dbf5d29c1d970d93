"""Apply a :class:`~search.policy.Policy` to a model: remove channels with torch-pruning.

(Optuna "prunes" trials; here "pruning" always means removing channels.)

torch-pruning's dependency graph groups every set of coupled channels: a conv's outputs with
the BatchNorm after it and the inputs of the convs that read them, and for residual networks
all the convs whose outputs meet in an addition. Each group is assigned to a stage of the
space (by module-name prefix) and classified as *stream* (channels coupled across several
convs by additions) or *inner* (a block's own channels); the policy's ratio for that stage
and kind says how many channels go, its criterion says which. The classifier's outputs are
never touched.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from search.errors import UsageError
from search.models.build import classifier_module
from search.pruning.graph import build_graph
from search.pruning.groups import GroupedUnit, grouped_convs, link_grouped, prune_whole_groups
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace, StageSpace
from search.pruning.views import check_no_inplace_views

if TYPE_CHECKING:
    from search.data.dataset import Dataset

__all__ = [
    "PrunedModel",
    "apply_policy",
    "architecture",
    "architecture_hash",
    "global_magnitude_allocation",
    "layer_channels",
]


@dataclass
class PrunedModel:
    model: nn.Module
    channels: dict[str, int]
    """Output channels (features for linear layers) of every conv and linear layer, by name."""
    arch_hash: str
    """Hash of the layer shapes: equal hashes mean equal latency, whatever the weights."""
    history: list[Any]
    """torch-pruning's pruning history (root layer, out-channels?, removed indices)."""
    removed: dict[str, int]
    """Channels removed per stage and kind, e.g. ``{"layer1.stream": 16}``."""


TAYLOR_IMAGES = 64
"""Training images whose gradients score channels for the ``taylor`` criterion."""


def prune_copy(baseline: nn.Module, policy: Policy, space: SearchSpace, data: Dataset, *, seed: int = 0) -> PrunedModel:
    """``policy`` applied to a copy of ``baseline`` (left as it is); Taylor scores come from
    :data:`TAYLOR_IMAGES` training images drawn with ``seed``."""
    model = copy.deepcopy(baseline)
    taylor = data.batches("train", 32, shuffle=True, augment=False, seed=seed, limit=TAYLOR_IMAGES)
    return apply_policy(model, policy, space, data.example_input(), taylor_batches=taylor)


def apply_policy(
    model: nn.Module,
    policy: Policy,
    space: SearchSpace,
    example_input: torch.Tensor,
    *,
    taylor_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PrunedModel:
    """Remove channels from ``model`` in place as ``policy`` says, and describe the result."""
    model.eval()
    graph = build_graph(model, example_input)
    if _uses(policy, "taylor"):
        _accumulate_gradients(model, taylor_batches)
    generator = torch.Generator().manual_seed(policy.seed)
    removed: Counter[str] = Counter()
    widths = grouped_convs(model)
    staged: Iterable[tuple[StageSpace, str, Any]] = _stage_groups(model, graph, space)  # lazily: concatenations
    units: dict[int, GroupedUnit] = {}  # re-index channels after each pruning (DenseNet), so groups come one by one
    where: dict[int, str] = {}
    if widths:  # grouped convolutions link groups, which must then all be known first
        staged = list(staged)
        units = link_grouped([group for _, _, group in staged], widths)
        where = {id(group): f"{stage.name}.{kind}" for stage, kind, group in staged}
    done: set[int] = set()
    for stage, kind, group in staged:
        choice = policy.stages.get(stage.name)
        ratio = 0.0 if choice is None else getattr(choice, kind)
        unit = units.get(id(group))
        if unit is not None:  # grouped convolutions: whole groups, the same ones in every linked group
            if id(unit) not in done and ratio > 0.0:
                for member, count in _prune_unit(graph, unit, ratio, choice.criterion, generator, widths):
                    removed[where.get(id(member), f"{stage.name}.{kind}")] += count
            done.add(id(unit))
            continue
        total = len(group[0].idxs)
        keep = _channels_to_keep(total, ratio, policy.round_to)
        if keep >= total:
            continue
        scores = _importance(choice.criterion, group, total, generator)
        drop = torch.argsort(scores)[: total - keep].tolist()
        group.prune(idxs=sorted(drop), record_history=False)  # the inner group records the history
        removed[f"{stage.name}.{kind}"] += total - keep
    model.zero_grad(set_to_none=True)
    channels = layer_channels(model)
    return PrunedModel(
        model=model,
        channels=channels,
        arch_hash=architecture_hash(model, tuple(example_input.shape[1:])),
        history=[[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in graph.pruning_history()],
        removed=dict(removed),
    )


def global_magnitude_allocation(
    model: nn.Module,
    space: SearchSpace,
    example_input: torch.Tensor,
    ratios: Iterable[float],
    *,
    max_ratio: float = 0.9,
) -> list[dict[str, tuple[float, float]]]:
    """Per ratio, per stage, the (stream, inner) fractions that global magnitude pruning would remove.

    This is torch-pruning's global magnitude recipe (``MagnitudePruner(global_pruning=True)``):
    each group's channels are scored by the L2 norm of their weights, normalised by the group's
    mean, and the ``ratio`` lowest-scoring channels of the whole network go, at most
    ``max_ratio`` of any group. A stage's inner fraction is the mean over its blocks. The model is
    not changed.
    """
    graph = build_graph(model.eval(), example_input)
    importance = tp.importance.MagnitudeImportance(p=2, normalizer="mean")
    scored = [
        (stage.name, kind, importance(group).detach().float())
        for stage, kind, group in _stage_groups(model, graph, space)
    ]
    every = torch.cat([scores for _, _, scores in scored]) if scored else torch.zeros(0)
    allocations = []
    for ratio in ratios:
        drop = int(len(every) * ratio)
        threshold = torch.kthvalue(every, drop).values.item() if drop > 0 else -math.inf
        fractions: dict[tuple[str, str], list[float]] = {}
        for name, kind, scores in scored:
            fraction = min(float((scores <= threshold).float().mean()), max_ratio)
            fractions.setdefault((name, kind), []).append(fraction)
        allocations.append(
            {
                stage.name: (
                    statistics.fmean(fractions.get((stage.name, "stream"), [0.0])),
                    statistics.fmean(fractions.get((stage.name, "inner"), [0.0])),
                )
                for stage in space.stages
            }
        )
    return allocations


def _stage_groups(model: nn.Module, graph: Any, space: SearchSpace) -> Iterator[tuple[StageSpace, str, Any]]:
    """Every prunable group of coupled channels, with the stage it belongs to and its kind (stream or inner)."""
    names = {module: name for name, module in model.named_modules()}
    _check_stages_match(space, names.values())
    check_no_inplace_views(model, graph)
    classifier = classifier_module(model)
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]):
        outputs = _out_channel_layers(graph, group, names)
        stage = _stage_of(outputs, space.stages)
        if stage is None:
            continue
        kind = "stream" if sum(not _is_depthwise(m) for _, m in outputs) >= 2 else "inner"
        yield stage, kind, group


def _prune_unit(
    graph: Any, unit: GroupedUnit, ratio: float, criterion: str, generator: torch.Generator, widths: dict[Any, Any]
) -> list[tuple[Any, int]]:
    """Remove the ``ratio`` least important whole convolution groups from every member of ``unit``."""
    count = unit.groups
    drop_groups = min(count - 1, round(count * ratio)) if count > 1 else 0
    if drop_groups <= 0:
        return []
    scores = torch.zeros(count)
    for member in unit.members:
        per_channel = _importance(criterion, member, len(member[0].idxs), generator)
        per_group = per_channel.view(count, -1).sum(dim=1)
        scores += per_group / per_group.mean().clamp_min(1e-12)
    dropped = sorted(torch.argsort(scores)[:drop_groups].tolist())
    pruned = []
    for member in unit.members:
        width = len(member[0].idxs) // count
        idxs = [g * width + k for g in dropped for k in range(width)]
        prune_whole_groups(graph, member, idxs, widths)
        pruned.append((member, len(idxs)))
    return pruned


def _channels_to_keep(total: int, ratio: float, round_to: int) -> int:
    if ratio <= 0.0 or total <= round_to:
        return total
    keep = total - round(total * ratio)
    keep = int(math.ceil(keep / round_to) * round_to)
    return max(round_to, min(total, keep))


_IMPORTANCE = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1, normalizer=None),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2, normalizer=None),
    "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer=None),
    "taylor": lambda: tp.importance.TaylorImportance(normalizer=None),
}


def _importance(criterion: str, group: Any, total: int, generator: torch.Generator) -> torch.Tensor:
    if criterion == "random":
        return torch.rand(total, generator=generator)
    scores = _IMPORTANCE[criterion]()(group)
    if scores is None:  # e.g. bn_scale on a group without BatchNorm: fall back to L1
        scores = _IMPORTANCE["l1"]()(group)
    return scores.detach().float().cpu()


def _uses(policy: Policy, criterion: str) -> bool:
    return any(s.criterion == criterion and (s.stream > 0 or s.inner > 0) for s in policy.stages.values())


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    if batches is None:
        raise ValueError("the taylor criterion needs training batches to compute gradients")
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen += 1
    if seen == 0:
        raise ValueError("the taylor criterion got no training batches")


def _out_channel_layers(graph: Any, group: Any, names: dict[nn.Module, str]) -> list[tuple[str, nn.Module]]:
    layers = []
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, (nn.Conv2d, nn.Linear)) and graph.is_out_channel_pruning_fn(dep.handler):
            layers.append((names.get(module, ""), module))
    return layers


def _in_stage(name: str, stage: StageSpace) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in stage.modules)


def _stage_of(layers: list[tuple[str, nn.Module]], stages: tuple[StageSpace, ...]) -> StageSpace | None:
    """The stage most of the group's output layers belong to (first one on a tie)."""
    votes: Counter[str] = Counter()
    for name, _ in layers:
        for stage in stages:
            if _in_stage(name, stage):
                votes[stage.name] += 1
                break
    if not votes:
        return None
    best = max(votes.values())
    return next(s for s in stages if votes.get(s.name) == best)


def _check_stages_match(space: SearchSpace, names: Iterable[str]) -> None:
    names = [n for n in names if n]
    for stage in space.stages:
        if not any(_in_stage(n, stage) for n in names):
            raise UsageError(
                f"stage {stage.name!r} of space {space.path} matches no module of the model "
                f"(prefixes {list(stage.modules)}); use a space written for this model (--space)"
            )
        for prefix in stage.modules:  # one mistyped prefix beside good ones would leave its modules unpruned
            if prefix and not any(n == prefix or n.startswith(prefix + ".") for n in names):
                near = difflib.get_close_matches(prefix, [n for n in names if "." not in n], n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise UsageError(
                    f"stage {stage.name!r} of space {space.path} names module {prefix!r}, which the model does not "
                    f"have{hint}; fix its modules list"
                )


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by qualified name."""
    channels = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            channels[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            channels[name] = module.out_features
    return channels


def architecture(model: nn.Module) -> list[list[Any]]:
    """Every layer with weights, as plain values that fix the model's cost."""
    layers: list[list[Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            layers.append(
                [
                    name,
                    "conv",
                    module.in_channels,
                    module.out_channels,
                    list(module.kernel_size),
                    list(module.stride),
                    module.groups,
                ]
            )
        elif isinstance(module, nn.Linear):
            layers.append([name, "linear", module.in_features, module.out_features])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            layers.append([name, "bn", module.num_features])
    return layers


def architecture_hash(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    blob = json.dumps({"input": list(input_shape), "layers": architecture(model)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

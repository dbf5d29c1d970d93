"""torch-pruning's concatenation re-indexing, replaced by a faster one: the same mappings, the same pruned models."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch_pruning.dependency.index_mapping as index_mapping
from torch import nn

from search.models.build import build_model
from search.pruning import fast_concat
from search.pruning.auto_space import space_for
from search.pruning.channels import apply_policy
from search.pruning.graph import build_graph


class _Repeats(nn.Module):
    """A concatenation that reads one input twice, and one of two others: the unmatched-dependency rule matters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(22, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.head(torch.cat([a, b, a], dim=1))


def _mappings(graph: Any, update: Any) -> list[tuple[int, str, Any]]:
    """Every dependency's input-side mapping after ``update`` re-indexed every concatenation of ``graph``."""
    for node in graph.module2node.values():
        update(graph, node)
    seen = []
    for node in graph.module2node.values():
        for dep in node.dependencies:
            mapping = dep.index_mapping[1]
            described = (type(mapping).__name__, getattr(mapping, "offset", None), getattr(mapping, "reverse", None))
            seen.append((id(dep), str(dep), described))
    return seen


def _same_mappings(model: nn.Module, example: torch.Tensor) -> None:
    graph = build_graph(model.eval(), example)
    theirs = _mappings(graph, fast_concat.ORIGINAL)
    for dep_node in graph.module2node.values():  # forget what torch-pruning set, so ours must set it again
        for dep in dep_node.dependencies:
            if isinstance(dep.index_mapping[1], index_mapping._ConcatIndexMapping):
                dep.index_mapping[1] = index_mapping._ConcatIndexMapping(offset=[-1, -1], reverse=None)
    ours = _mappings(graph, fast_concat.update_concat_index_mapping)
    assert ours == theirs
    assert any(d[2][0] == "_ConcatIndexMapping" and d[2][1] != [-1, -1] for d in ours), "the model concatenates"


def test_every_dependency_gets_the_mapping_torch_pruning_gives_it() -> None:
    _same_mappings(_Repeats(), torch.randn(1, 3, 8, 8))
    _same_mappings(build_model("densenet121", 10), torch.randn(1, 3, 32, 32))


def test_densenet_pruned_with_it_is_the_model_torch_pruning_prunes_and_it_is_in_place() -> None:
    assert index_mapping.update_concat_index_mapping is fast_concat.update_concat_index_mapping, "installed on import"
    torch.manual_seed(0)
    example = torch.randn(1, 3, 32, 32)
    model = build_model("densenet121", 10)
    space = space_for("densenet121", None, 10, example, model=model)
    policy = space.uniform(0.5)
    ours = apply_policy(copy.deepcopy(model), policy, space, example)
    try:
        index_mapping.update_concat_index_mapping = fast_concat.ORIGINAL
        theirs = apply_policy(copy.deepcopy(model), policy, space, example)
    finally:
        fast_concat.install()
    assert ours.arch_hash == theirs.arch_hash and ours.history == theirs.history
    theirs_state = theirs.model.state_dict()
    for name, mine in ours.model.state_dict().items():
        assert torch.equal(mine, theirs_state[name]), name
    with torch.no_grad():
        assert torch.equal(ours.model.eval()(example), theirs.model.eval()(example))

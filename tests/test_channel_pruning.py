"""Policies applied with torch-pruning on real torchvision architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision

from search.errors import UsageError
from search.pruning.channels import apply_policy, layer_channels
from search.pruning.policy import Policy, StagePolicy
from search.pruning.space import load_space

X = torch.randn(2, 3, 64, 64)


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_uniform_policy_removes_the_expected_channels_and_keeps_the_classifier() -> None:
    space = load_space("spaces/resnet18.toml")
    pruned = apply_policy(_resnet18(), space.uniform(0.5), space, X[:1])
    ch = pruned.channels
    # 64 channels at ratio 0.5 keep 32; 512 keep 256 (multiples of round_to=8).
    assert ch["conv1"] == 32 and ch["layer1.0.conv1"] == 32
    assert ch["layer4.0.conv1"] == 256 and ch["layer4.1.conv2"] == 256
    assert ch["fc"] == 10, "the classifier's outputs are never pruned"
    assert pruned.model(X).shape == (2, 10)
    assert sum(p.numel() for p in pruned.model.parameters()) < 0.3 * 11.2e6


def test_residual_coupled_channels_are_pruned_together() -> None:
    space = load_space("spaces/resnet18.toml")
    policy = Policy(
        stages={
            name: StagePolicy(stream=0.25 if name == "layer2" else 0.0)
            for name in ("layer1", "layer2", "layer3", "layer4")
        }
    )
    ch = apply_policy(_resnet18(), policy, space, X[:1]).channels
    assert ch["layer2.0.conv2"] == ch["layer2.0.downsample.0"] == ch["layer2.1.conv2"] == 96
    assert ch["layer2.0.conv1"] == 128 and ch["layer2.1.conv1"] == 128, "inner channels untouched"
    assert ch["layer1.0.conv2"] == 64 and ch["layer3.0.conv2"] == 256, "other stages untouched"


@pytest.mark.parametrize("round_to", [8, 16])
def test_kept_channels_are_multiples_of_round_to(round_to: int) -> None:
    space = load_space("spaces/resnet18.toml")
    policy = space.uniform(0.35)
    policy = Policy(stages=policy.stages, round_to=round_to)
    ch = apply_policy(_resnet18(), policy, space, X[:1]).channels
    assert all(c % round_to == 0 for name, c in ch.items() if name != "fc")


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "random"])
def test_every_criterion_prunes_and_criteria_choose_differently(criterion: str) -> None:
    space = load_space("spaces/resnet18.toml")
    model = _resnet18()
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))]
    pruned = apply_policy(model, space.uniform(0.35, criterion), space, X[:1], taylor_batches=batches)
    assert pruned.model(X).shape == (2, 10)
    assert pruned.history, "the pruning history records which channels went"
    assert all(p.grad is None for p in pruned.model.parameters())


def test_same_shapes_give_the_same_architecture_hash_whatever_the_criterion() -> None:
    space = load_space("spaces/resnet18.toml")
    a = apply_policy(_resnet18(), space.uniform(0.35, "l1"), space, X[:1])
    b = apply_policy(_resnet18(), space.uniform(0.35, "random"), space, X[:1])
    c = apply_policy(_resnet18(), space.uniform(0.5, "l1"), space, X[:1])
    assert a.arch_hash == b.arch_hash != c.arch_hash


@pytest.mark.parametrize(
    "arch,space_file", [("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2"), ("resnet34", "resnet34")]
)
def test_other_families_prune_and_still_run(arch: str, space_file: str) -> None:
    space = load_space(f"spaces/{space_file}.toml")
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    before = sum(p.numel() for p in model.parameters())
    pruned = apply_policy(model, space.fastest_policies()[0], space, X[:1])
    assert pruned.model(X).shape == (2, 10)
    assert sum(p.numel() for p in pruned.model.parameters()) < 0.6 * before
    assert pruned.removed


def test_a_space_for_another_model_is_a_usage_error() -> None:
    space = load_space("spaces/mobilenet_v2.toml")
    with pytest.raises(UsageError, match="matches no module"):
        apply_policy(_resnet18(), space.uniform(0.2), space, X[:1])


def test_a_mistyped_module_beside_good_ones_is_a_usage_error_with_the_near_name(tmp_path) -> None:
    text = (
        open("spaces/resnet18.toml")
        .read()
        .replace('modules = ["conv1", "bn1", "layer1"]', 'modules = ["conv9", "bn1", "layer1"]')
    )
    (tmp_path / "typo.toml").write_text(text)
    space = load_space(str(tmp_path / "typo.toml"))
    with pytest.raises(UsageError, match="names module 'conv9', which the model does not have \\(did you mean 'conv1'"):
        apply_policy(_resnet18(), space.uniform(0.2), space, X[:1])


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_pruning_history_rebuilds_exactly_the_same_model(criterion: str) -> None:
    from search.shipping.rebuild import replay_history as _replay

    space = load_space("spaces/resnet18.toml")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    import copy

    pruned = apply_policy(copy.deepcopy(base), space.uniform(0.35, criterion), space, X[:1])
    rebuilt = copy.deepcopy(base)
    _replay(rebuilt, pruned.history, X[:1])
    assert layer_channels(rebuilt) == pruned.channels
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), pruned.model(X))


def test_global_magnitude_allocation_matches_torch_prunings_global_recipe() -> None:
    import copy

    import torch_pruning as tp

    from search.pruning.channels import global_magnitude_allocation

    space = load_space("spaces/resnet18.toml")
    model = _resnet18()
    with torch.no_grad():  # half of one block's channels nearly dead: the global recipe should take them
        model.layer3[1].conv1.weight[:128] *= 0.01
    before = layer_channels(model)
    half, none = global_magnitude_allocation(model, space, X[:1], [0.3, 0.0])
    assert layer_channels(model) == before, "the model is left as it was"
    assert all(f == (0.0, 0.0) for f in none.values())

    reference = copy.deepcopy(model)
    tp.pruner.MagnitudePruner(
        reference,
        X[:1],
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=0.3,
        max_pruning_ratio=0.9,
        ignored_layers=[reference.fc],
    ).step()
    after = layer_channels(reference)
    removed = {name: 1 - after[name] / before[name] for name in before}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        stream, inner = half[stage]
        assert stream == pytest.approx(removed[f"{stage}.0.conv2"], abs=0.02), stage
        expected_inner = (removed[f"{stage}.0.conv1"] + removed[f"{stage}.1.conv1"]) / 2
        assert inner == pytest.approx(expected_inner, abs=0.02), stage
    assert half["layer3"][1] > max(half[s][1] for s in ("layer1", "layer2", "layer4")), "the dead channels go first"

    policy = space.allocated(half, "l2")
    assert policy.stages["layer3"].inner == pytest.approx(round(half["layer3"][1] / 0.05) * 0.05)
    assert {s.criterion for s in policy.stages.values()} == {"l2"}


class _LayerScaled(torch.nn.Module):
    """ConvNeXt's pattern: a block's output multiplied by a per-channel parameter that no layer holds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.block = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.layer_scale = torch.nn.Parameter(torch.rand(32, 1, 1) + 0.5)
        self.head = torch.nn.Conv2d(32, 16, 1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.layer_scale * self.block(x)
        return self.fc(self.head(x).mean(dim=(2, 3)))


def test_a_parameter_outside_any_layer_is_pruned_with_its_channels_and_nothing_is_warned() -> None:
    import warnings

    torch.manual_seed(0)
    model = _LayerScaled().eval()
    space = load_space("spaces/generic.toml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = apply_policy(model, space.uniform(0.5), space, X[:1])
    assert not [str(w.message) for w in caught if "nwrapped" in str(w.message)], "torch-pruning's warning leaked"
    assert pruned.channels["stem"] == 16 and pruned.channels["block"] == 16
    assert tuple(model.layer_scale.shape) == (16, 1, 1), "the scale lost the same channels as the convs it scales"
    assert pruned.model(X).shape == (2, 10)

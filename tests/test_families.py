"""Every torchvision CNN family by name: pruned, exported to ONNX, checked and timed at a tiny input.

The models are untrained (no training here): what is checked is that a trial's path (prune with
the family's space, ONNX export, ONNX Runtime parity, timing) works for each family, that
grouped convolutions lose whole groups, and that what cannot work is refused with its reason.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
import torchvision
from torch import nn

from search.errors import UsageError
from search.measuring.complexity import macs_and_params
from search.measuring.onnx_export import export_onnx
from search.measuring.preflight import check_searchable
from search.measuring.quantize import QuantizeSettings, quantize_onnx
from search.measuring.timing import LatencySettings, measure
from search.models.build import KNOWN_MODELS, build_model, check_model_name
from search.models.families import CNN_FAMILIES, family_of
from search.pruning.auto_space import model_stages, space_for
from search.pruning.channels import apply_policy
from search.pruning.groups import replay
from search.pruning.space import load_space
from tests.conftest import run_cli, run_main

REPRESENTATIVES = {
    "resnet": ("resnet18", 32),
    "resnext": ("resnext50_32x4d", 32),
    "wide_resnet": ("wide_resnet50_2", 32),
    "mobilenet_v2": ("mobilenet_v2_cifar", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32),
    "efficientnet": ("efficientnet_b0", 32),
    "efficientnet_v2": ("efficientnet_v2_s", 32),
    "regnet": ("regnet_x_400mf", 32),
    "regnet_y": ("regnet_y_400mf", 32),
    "convnext": ("convnext_tiny", 32),
    "mnasnet": ("mnasnet0_5", 32),
    "squeezenet": ("squeezenet1_1", 32),
    "densenet": ("densenet121", 32),
    "googlenet": ("googlenet", 32),
    "inception_v3": ("inception_v3", 75),
    "vgg": ("vgg11_cifar", 32),
    "alexnet": ("alexnet", 224),
}
"""One model per family (two for RegNet: X and Y blocks differ) at a small input it supports."""

FAST = LatencySettings(warmup=2, round_size=3, min_rounds=2, max_seconds=2.0)


def test_every_torchvision_cnn_is_known_by_its_bare_name() -> None:
    cnns = [n for n in torchvision.models.list_models(module=torchvision.models) if family_of(n)]
    assert len(cnns) > 60
    for name in cnns:
        check_model_name(name)
    assert {family_of(n) for n in cnns} == set(CNN_FAMILIES)
    assert {f for f, _ in REPRESENTATIVES.values()} <= set(KNOWN_MODELS)
    for variant in ("resnet18_cifar", "resnext50_32x4d_cifar", "wide_resnet50_2_cifar", "vgg16_cifar"):
        assert KNOWN_MODELS[variant].small_input


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vit_b_16", "transformer"),
        ("swin_t", "transformer"),
        ("maxvit_t", "transformer"),
        ("shufflenet_v2_x1_0", "channel shuffle"),
        ("resnet81", "did you mean resnet18"),
    ],
)
def test_models_that_cannot_be_searched_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        check_model_name(name)


def test_a_refused_model_is_a_one_line_error_before_any_data_is_read(tmp_path) -> None:
    result = run_main("search", "--budget-ms", "5", "--model", "swin_t", "--data", f"imagefolder:{tmp_path}/absent",
                      "--studies-dir", str(tmp_path / "studies"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: model swin_t (vision transformer) is not supported")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REPRESENTATIVES))
def test_each_family_prunes_exports_matches_and_times(family: str) -> None:
    _prune_export_match_and_time(*REPRESENTATIVES[family])


TIMM_CNNS = ("mobilenetv3_small_050", "resnet10t", "efficientnet_b0", "regnetx_002", "lcnet_050", "hardcorenas_a")
"""timm CNNs given as ``timm.models:NAME`` factories (untrained: timm is a test extra, never downloaded)."""


@pytest.mark.slow
@pytest.mark.parametrize("arch", TIMM_CNNS)
def test_timm_cnns_prune_export_match_and_time(arch: str) -> None:
    pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    _prune_export_match_and_time(f"timm.models:{arch}", 32)
    check_searchable(arch, build_model(f"timm.models:{arch}", 10), space_for(f"timm.models:{arch}", None, 10,
                     torch.randn(1, 3, 32, 32)), torch.randn(1, 3, 32, 32))  # fmt: skip


def test_timm_ghostnet_is_refused_naming_the_module_that_writes_into_a_channel_slice() -> None:
    pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    name, example = "timm.models:ghostnet_100", torch.randn(1, 3, 32, 32)
    with pytest.raises(UsageError, match=r"module blocks\.0\.0\.ghost2 \(GhostModule\) writes in place") as caught:
        check_searchable(name, build_model(name, 10), space_for(name, None, 10, example), example)
    assert "\n" not in str(caught.value)


def test_a_model_writing_into_a_channel_slice_is_refused_before_it_loses_whole_layers() -> None:
    """GhostNet's construct, without timm: before the refusal, uniform(0.5) left a convolution with 0 filters."""
    name, example = "tests.test_families:GhostLikeNet", torch.randn(1, 3, 16, 16)
    space = space_for(name, None, 10, example)
    with pytest.raises(UsageError, match=r"GhostLikeNet is not supported: its module blocks\.0 \(GhostModule\)"):
        apply_policy(build_model(name, 10), space.uniform(0.5), space, example)
    with pytest.raises(UsageError, match="slice of its channels") as caught:
        check_searchable(name, build_model(name, 10), space, example)
    assert "\n" not in str(caught.value) and "1 more module does too" in str(caught.value)


def _prune_export_match_and_time(name: str, size: int) -> None:
    """A trial's path for model ``name`` at ``size`` px: prune, export, parity, replay, time, INT8."""
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    example = torch.randn(1, 3, size, size)
    space = space_for(name, None, 10, example)
    pruned = copy.deepcopy(model)
    result = apply_policy(pruned, space.uniform(0.35), space, example)
    assert sum(result.removed.values()) > 0, result.removed
    assert macs_and_params(pruned, size)[0] < macs_and_params(model, size)[0]

    batch = torch.randn(2, 3, size, size)
    onnx_model = export_onnx(pruned, example)
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": batch[:1].numpy()})[0]
    with torch.no_grad():
        want = pruned(batch).numpy()
    assert want.shape == (2, 10)  # the classifier keeps one output per class (SqueezeNet's is a convolution)
    assert np.abs(got - want[:1]).max() <= 1e-3 * np.abs(want).max()

    rebuilt = copy.deepcopy(model)
    replay(rebuilt, result.history, example)  # what export does from the trial's stored history
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(batch), pruned(batch), atol=1e-5)

    latency = measure(onnx_model, tuple(example.shape), FAST, reference=export_onnx(model, example))
    assert latency.median_ms > 0 and latency.ratio is not None

    int8 = quantize_onnx(onnx_model, [batch[:1].numpy()], QuantizeSettings())  # what an INT8 trial times and ships
    session = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": batch[:1].numpy()})[0]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()


def test_stages_are_named_after_the_models_own_modules() -> None:
    example = torch.randn(1, 3, 64, 64)
    stages = dict(model_stages(build_model("mobilenet_v3_small", 10), example))
    assert "features.4-8" in stages and stages["features.4-8"][0] == "features.4"
    modules = dict(build_model("mobilenet_v3_small", 10).named_modules())
    assert all(m in modules for prefixes in stages.values() for m in prefixes)
    inception = [name for name, _ in model_stages(build_model("inception_v3", 10), torch.randn(1, 3, 75, 75))]
    assert "Mixed_5b..Mixed_5d" in inception and "Mixed_6a..Mixed_6e" in inception
    resnet = space_for("resnet50", None, 10, example)  # a family with a hand-written file keeps it
    assert resnet.path.endswith("spaces/resnet50.toml")


class GroupedNet(nn.Module):
    """A user's CNN with grouped (not depthwise) convolutions, as in ResNeXt and RegNet."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        conv = nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False)
        self.grouped = nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.grouped(self.stem(x))))


class GhostModule(nn.Module):
    """timm's GhostNet module: a primary convolution and cheap depthwise features, concatenated and sliced."""

    def __init__(self, chs_in: int, chs_out: int) -> None:
        super().__init__()
        self.out_chs = chs_out
        self.primary_conv = nn.Sequential(nn.Conv2d(chs_in, chs_out // 2, 1, bias=False), nn.BatchNorm2d(chs_out // 2))
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(chs_out // 2, chs_out // 2, 3, padding=1, groups=chs_out // 2, bias=False),
            nn.BatchNorm2d(chs_out // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], dim=1)[:, : self.out_chs]


class GhostLikeNet(nn.Module):
    """Residual GhostNet-style blocks that add their shortcut in place into the slice, as timm's GhostNet does."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(GhostModule(16, 16) for _ in range(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            shortcut = x
            x = block(x)
            x += shortcut
        return self.fc(self.head(x))


def test_grouped_convolutions_lose_whole_groups() -> None:
    torch.manual_seed(0)
    model = GroupedNet().eval()
    example = torch.randn(1, 3, 16, 16)
    space = space_for("tests.test_families:GroupedNet", None, 10, example)
    pruned = copy.deepcopy(model)
    result = apply_policy(pruned, space.uniform(0.5), space, example)
    conv = pruned.grouped[0]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 16, 32)  # 2 of 4 groups of 8 -> 16 inputs
    assert pruned.stem[0].out_channels == 16 and result.removed
    session = ort.InferenceSession(export_onnx(pruned, example), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = pruned(example).numpy()
    assert np.allclose(session.run(None, {"input": example.numpy()})[0], want, atol=1e-4)
    rebuilt = copy.deepcopy(model)
    replay(rebuilt, result.history, example)
    assert rebuilt.grouped[0].groups == 2
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(example), pruned(example), atol=1e-5)


def test_a_model_the_dependency_graph_cannot_trace_is_refused_before_the_study() -> None:
    name = "torchvision.models:shufflenet_v2_x0_5"  # as a factory, past the refusal by name
    example = torch.randn(1, 3, 64, 64)
    space = space_for(name, None, 10, example)
    with pytest.raises(UsageError, match="torch-pruning cannot remove its channels") as caught:
        check_searchable(name, build_model(name, 10), space, example)
    assert "\n" not in str(caught.value) and "ZeroDivisionError" in str(caught.value)


def test_a_model_onnx_cannot_express_at_this_size_is_refused_with_the_size_to_use() -> None:
    example = torch.randn(1, 3, 64, 64)
    space = space_for("vgg11", None, 10, example)
    with pytest.raises(UsageError, match=r"at input 3x64x64.*--input-size 224"):
        check_searchable("vgg11", build_model("vgg11", 10), space, example)


@pytest.mark.slow
def test_a_grouped_family_searches_and_exports_end_to_end_with_its_module_names(tmp_path) -> None:
    """RegNet (grouped convolutions, derived space): baseline, search with INT8, export of a pruned trial."""
    studies = tmp_path / "studies"
    common = ["--study", "regnet", "--studies-dir", str(studies)]
    search = run_cli(
        "search", "--model", "regnet_x_400mf", "--input-size", "32", "--baseline-epochs", "1",
        "--budget-fraction", "0.9", "--trials", "2", "--finetune-steps", "2", "--bn-batches", "2",
        "--val-images", "64", *common,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-2000:]
    url = f"sqlite:///{studies}/regnet.db"
    study = optuna.load_study(study_name="regnet", storage=url)
    pruned = [
        t for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("pruning_history")
    ]  # fmt: skip
    assert pruned, [t.user_attrs.get("recipe") for t in study.trials]
    # A pruned trial's policy names its stages by the model's modules (the recommendation may be the unpruned
    # INT8 model: the fastest of those tied with the most accurate).
    shown = run_cli("show", "--trial", str(pruned[0].number), *common)
    assert shown.returncode == 0 and "trunk_output.block" in shown.stdout, shown.stdout[-2000:]
    out = tmp_path / "export"
    export = run_cli("export", "--trial", str(pruned[0].number), "--epochs", "0.05", "--test-images", "64",
                     "--out", str(out), *common)  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    folder = next(out.glob("trial-*"))
    card = json.loads((folder / "card.json").read_text())
    assert any(name.startswith("trunk_output.block") for name in card["policy"]["stages"])
    distilled = card["feature_distill"]  # on by default: its adapters named by the dotted stages
    assert distilled["weight"] > 0 and any(name.startswith("trunk_output.block") for name in distilled["stages"])
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


def test_models_lists_every_family_and_space_prints_a_space_that_loads(tmp_path) -> None:
    listed = run_main("models")
    assert listed.returncode == 0
    for name in ("regnet_x_400mf", "mobilenet_v3_small", "vgg16_bn_cifar", "mobilenet_v2_cifar"):
        assert name in listed.stdout
    assert "refused" in listed.stdout and "shufflenet_v2" in listed.stdout
    printed = run_main("space", "mnasnet0_5", "--input-size", "64")
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "mnasnet.toml").write_text(printed.stdout)
    space = load_space(tmp_path / "mnasnet.toml")  # what a user saves, edits and passes with --space
    assert [s.name for s in space.stages][:2] == ["layers.0-6", "layers.8"]
    refused = run_main("space", "vit_b_16")
    assert refused.returncode == 2 and "transformer" in refused.stderr

"""Building the known and custom models, and loading the weights users bring for them."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from search.errors import UsageError
from search.models.build import KNOWN_MODELS, build_model, classifier_name, model_family
from search.models.checkpoint import file_sha256, read_checkpoint_meta, save_checkpoint
from search.models.weights import LoadedWeights, load_weights

SHARED_BASELINE = Path(__file__).resolve().parents[1].parent / "shared/models/cifar10_resnet18.pth"


def _logits(model: nn.Module, size: int = 8) -> torch.Tensor:
    """The model's output on a fixed ``size``×``size`` input (small: comparisons only)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size, generator=generator))


def _saved(tmp_path: Path, obj: object, name: str = "weights.pth") -> str:
    """``torch.save`` ``obj`` under ``tmp_path`` and return the path as a string."""
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A resnet18_cifar with 10 classes standing in for a user's trained model (not modified)."""
    torch.manual_seed(1)
    return build_model("resnet18_cifar", 10).eval()


@pytest.fixture(scope="module")
def trained_file(trained: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``trained``'s plain state_dict saved with ``torch.save``."""
    return _saved(tmp_path_factory.mktemp("trained"), trained.state_dict())


# --------------------------------------------------------------------------- building


SMALL_INPUT = [n for n, spec in KNOWN_MODELS.items() if spec.small_input and "101" not in n and "152" not in n]


@pytest.mark.parametrize("name", [*SMALL_INPUT, "resnet18", "mobilenet_v2", "regnet_x_400mf", "googlenet"])
def test_known_models_give_one_logit_per_class(name: str) -> None:
    # every family's representative runs in tests/test_families.py; here each small-input variant and a few others
    assert _logits(build_model(name, 7), size=32 if name in SMALL_INPUT else 64).shape == (1, 7)


@pytest.mark.parametrize("name", ["vgg11_cifar", "mobilenet_v2_cifar", "wide_resnet50_2_cifar"])
def test_small_input_variants_keep_resolution_for_32px_images(name: str) -> None:
    model = build_model(name, 10).eval()
    sizes = []
    model.get_submodule("features" if "resnet" not in name else "layer4").register_forward_hook(
        lambda _m, _i, out: sizes.append(tuple(out.shape[2:]))
    )
    _logits(model, size=32)
    assert sizes == [{"vgg11_cifar": (1, 1), "mobilenet_v2_cifar": (4, 4), "wide_resnet50_2_cifar": (4, 4)}[name]]


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet34_cifar", "resnet50_cifar"])
def test_cifar_variant_has_small_input_stem(name: str) -> None:
    model = build_model(name, 10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert build_model(name.removesuffix("_cifar"), 10).conv1.kernel_size == (7, 7)


def test_model_family_and_classifier_name() -> None:
    assert model_family("resnet18_cifar") == "resnet18"
    assert model_family("resnet50") == "resnet50"
    assert model_family("mobilenet_v2") == "mobilenet_v2"
    assert model_family("mypkg.nets:tiny") is None
    assert classifier_name(build_model("resnet18", 10)) == "fc"
    assert classifier_name(build_model("mobilenet_v2", 10)) == "classifier.1"


def test_unknown_model_suggests_close_names_and_the_factory_form() -> None:
    with pytest.raises(UsageError) as raised:
        build_model("resnet19", 10)
    message = str(raised.value)
    assert "did you mean resnet18" in message and "cli.py models" in message
    assert "module:function" in message


@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module with a tiny CNN and a few factories; returns its name."""
    name = f"tiny_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class TinyNet(nn.Module):
            def __init__(self, num_classes: int = 10) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.head = nn.Linear(8, num_classes)

            def forward(self, x):
                return self.head(self.pool(self.conv(x).relu()).flatten(1))

        def tiny(num_classes=10):
            return TinyNet(num_classes)

        def tiny_fixed():
            return TinyNet(5)

        def not_a_model(num_classes=10):
            return "a string"

        def needs_arg(n_classes):
            return TinyNet(n_classes)

        def fails(num_classes=10):
            return TinyNet(num_classes, depth=3)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_factory_builds_with_num_classes(custom_module: str) -> None:
    model = build_model(f"{custom_module}:tiny", 3)
    assert _logits(model).shape == (1, 3)
    assert classifier_name(model) == "head"
    assert _logits(build_model(f"{custom_module}:tiny_fixed", 3)).shape == (1, 5)
    assert _logits(build_model(f"{custom_module}:TinyNet", 4)).shape == (1, 4)


def test_custom_factory_not_returning_module_is_refused(custom_module: str) -> None:
    with pytest.raises(UsageError, match=r"not a torch\.nn\.Module"):
        build_model(f"{custom_module}:not_a_model", 3)


def test_bad_custom_factory_names_module_and_reason(custom_module: str) -> None:
    with pytest.raises(UsageError, match=r"no_such_module_xyz.*ModuleNotFoundError"):
        build_model("no_such_module_xyz:net", 3)
    with pytest.raises(UsageError, match=f"{custom_module}.*AttributeError"):
        build_model(f"{custom_module}:missing", 3)


def test_a_factory_that_needs_arguments_fails_or_does_not_parse_is_one_line(
    custom_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UsageError, match=r"needs_arg needs n_classes; give one that takes no arguments, or only"):
        build_model(f"{custom_module}:needs_arg", 3)
    with pytest.raises(UsageError, match=r"fails raised TypeError: .*depth.* \(at .*tiny_nets_\w+\.py:\d+\)"):
        build_model(f"{custom_module}:fails", 3)
    (tmp_path / "broken_nets_x1.py").write_text("def net(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"SyntaxError at .*broken_nets_x1\.py:1"):
        build_model("broken_nets_x1:net", 3)


def test_imagenet_refused_for_custom_and_small_input_models(custom_module: str) -> None:
    with pytest.raises(UsageError, match="--weights PATH"):
        load_weights(build_model(f"{custom_module}:tiny", 3), "imagenet", model_name=f"{custom_module}:tiny")
    with pytest.raises(UsageError, match="--model resnet18"):
        load_weights(build_model("resnet18_cifar", 1000), "imagenet", model_name="resnet18_cifar")


# --------------------------------------------------------------------------- loading files


def test_plain_state_dict_round_trips(trained: nn.Module, trained_file: str) -> None:
    path = trained_file
    fresh = build_model("resnet18_cifar", 10)
    expected = _logits(trained)
    assert not torch.equal(_logits(fresh), expected)
    loaded = load_weights(fresh, path, model_name="resnet18_cifar")
    assert torch.equal(_logits(fresh), expected)
    assert loaded == LoadedWeights(path, "state_dict", file_sha256(path), None)


def test_data_parallel_prefix_is_stripped(tmp_path: Path, trained: nn.Module) -> None:
    prefixed = OrderedDict((f"module.{k}", v) for k, v in trained.state_dict().items())
    fresh = build_model("resnet18_cifar", 10)
    loaded = load_weights(fresh, _saved(tmp_path, prefixed), model_name="resnet18_cifar")
    assert loaded.stripped_prefix == "module."
    assert torch.equal(_logits(fresh), _logits(trained))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_training_script_wrappers_load(tmp_path: Path, trained: nn.Module, key: str) -> None:
    path = _saved(tmp_path, {key: trained.state_dict(), "epoch": 3, "best_acc": 0.9})
    fresh = build_model("resnet18_cifar", 10)
    assert load_weights(fresh, path, model_name="resnet18_cifar").kind == "state_dict"
    assert torch.equal(_logits(fresh), _logits(trained))


def test_state_dict_without_batchnorm_counters_loads(tmp_path: Path, trained: nn.Module) -> None:
    old_style = {k: v for k, v in trained.state_dict().items() if "num_batches" not in k}
    fresh = build_model("resnet18_cifar", 10)
    load_weights(fresh, _saved(tmp_path, old_style), model_name="resnet18_cifar")
    assert torch.equal(_logits(fresh), _logits(trained))


def test_checkpoint_round_trips_with_meta(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "runs" / "a" / "best.pt"
    meta = {"trial": 3, "top1": 0.81, "policy": {"layer1": [0.25, "l1"]}, "note": None}
    digest = save_checkpoint(path, trained, model_name="resnet18_cifar", num_classes=10, meta=meta)
    assert digest == file_sha256(path)
    assert os.listdir(path.parent) == ["best.pt"]  # no temporary file left behind
    assert read_checkpoint_meta(path) == meta

    fresh = build_model("resnet18_cifar", 10)
    loaded = load_weights(fresh, str(path), model_name="resnet18_cifar")
    assert (loaded.kind, loaded.sha256) == ("checkpoint", digest)
    assert torch.equal(_logits(fresh), _logits(trained))


def test_meta_of_plain_state_dict_is_none(trained_file: str) -> None:
    assert read_checkpoint_meta(trained_file) is None


def test_checkpoint_meta_must_be_plain_data(tmp_path: Path, trained: nn.Module) -> None:
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(
            tmp_path / "c.pt", trained, model_name="resnet18_cifar", num_classes=10, meta={"path": Path("x")}
        )
    assert not (tmp_path / "c.pt").exists()


def test_wrong_class_count_names_both(tmp_path: Path) -> None:
    path = _saved(tmp_path, build_model("resnet18_cifar", 3).state_dict())
    with pytest.raises(UsageError) as raised:
        load_weights(build_model("resnet18_cifar", 10), path, model_name="resnet18_cifar")
    assert "3 output classes" in str(raised.value)
    assert "10 classes" in str(raised.value)


def test_small_input_weights_into_full_model_suggest_cifar_variant(trained_file: str) -> None:
    with pytest.raises(UsageError) as raised:
        load_weights(build_model("resnet18", 10), trained_file, model_name="resnet18")
    message = str(raised.value)
    assert "conv1.weight is [64,3,3,3] in the file but [64,3,7,7] in the model" in message
    assert "try --model resnet18_cifar" in message


def test_full_weights_into_cifar_variant_name_shapes_and_hint(tmp_path: Path) -> None:
    path = _saved(tmp_path, build_model("resnet18", 10).state_dict())
    with pytest.raises(UsageError) as raised:
        load_weights(build_model("resnet18_cifar", 10), path, model_name="resnet18_cifar")
    message = str(raised.value)
    assert "conv1.weight is [64,3,7,7] in the file but [64,3,3,3] in the model" in message
    assert "--model resnet18" in message


def test_resnet18_weights_into_resnet34_name_missing_keys(tmp_path: Path) -> None:
    path = _saved(tmp_path, build_model("resnet18", 10).state_dict())
    with pytest.raises(UsageError) as raised:
        load_weights(build_model("resnet34", 10), path, model_name="resnet34")
    message = str(raised.value)
    assert "don't fit resnet34" in message
    assert "missing: layer1.2.conv1.weight [64,64,3,3]" in message
    assert "try --model resnet18" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_weights(build_model("resnet18", 10), str(tmp_path / "nope.pth"), model_name="resnet18")


def test_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path, nn.Linear(2, 2))
    with pytest.raises(UsageError, match=r"weights_only=False.*state_dict"):
        load_weights(build_model("resnet18", 10), path, model_name="resnet18")


def test_an_exports_torchscript_file_given_as_weights_names_the_file_to_pass(tmp_path: Path) -> None:
    scripted = torch.jit.trace(build_model("resnet18_cifar", 10).eval(), torch.randn(1, 3, 32, 32))
    torch.jit.save(scripted, str(tmp_path / "model.torchscript.pt"))
    with pytest.raises(UsageError, match=r"TorchScript program .*not a state_dict; pass .*model\.pt"):
        load_weights(build_model("resnet18_cifar", 10), str(tmp_path / "model.torchscript.pt"), model_name="x")


# --------------------------------------------------------------------------- imagenet


def _hub_file(hub: Path, arch: str) -> Path:
    """Where torch.hub keeps torchvision's published weights for ``arch`` under ``hub``."""
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return hub / "checkpoints" / os.path.basename(url)


def test_imagenet_loads_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    published = build_model("resnet18", 1000)
    cached = _hub_file(tmp_path, "resnet18")
    cached.parent.mkdir()
    torch.save(published.state_dict(), cached)

    fresh = build_model("resnet18", 1000)
    loaded = load_weights(fresh, "imagenet", model_name="resnet18")
    assert loaded == LoadedWeights("imagenet", "imagenet", file_sha256(cached), None)
    assert torch.equal(_logits(fresh), _logits(published))


# --------------------------------------------------------------------------- shared baseline


@pytest.mark.skipif(not SHARED_BASELINE.exists(), reason=f"{SHARED_BASELINE} is absent")
def test_shared_cifar10_baseline_loads_into_resnet18_cifar() -> None:
    loaded = load_weights(build_model("resnet18_cifar", 10), str(SHARED_BASELINE), model_name="resnet18_cifar")
    assert loaded.kind == "state_dict"
    with pytest.raises(UsageError, match="try --model resnet18_cifar"):
        load_weights(build_model("resnet18", 10), str(SHARED_BASELINE), model_name="resnet18")

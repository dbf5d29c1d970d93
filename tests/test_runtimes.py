"""--runtime: ONNX Runtime, OpenVINO and ExecuTorch time through the one seam, ship files that pass parity,
serve them, and a study keeps its runtime. Each optional runtime's tests skip, saying why, where it is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from search.data.spec import DataSpec
from search.errors import UsageError
from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.hardware import fingerprint
from search.measuring.onnx_export import export_onnx
from search.measuring.quantize import QuantizeSettings, calibration_batches, quantize_onnx
from search.measuring.runtimes.registry import get_runtime
from search.measuring.timing import LatencySettings
from search.shipping.settings import ExportSettings
from search.study.config import SearchConfig
from tests.conftest import ROOT, run_main

FAST = LatencySettings(threads=1, warmup=3, round_size=5, min_rounds=2, max_seconds=5)
SMALL = QuantizeSettings(calibration_images=32)


def _needs(name: str) -> pytest.MarkDecorator:
    problem = get_runtime(name).unavailable()
    return pytest.mark.skipif(
        problem is not None, reason=f'{name} is not installed ({problem}); pip install -e ".[{name}]"'
    )


OPTIONAL = [pytest.param(name, marks=_needs(name)) for name in ("openvino", "executorch")]
ALL = [pytest.param("onnxruntime"), *OPTIONAL]


def _cnn(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


@pytest.mark.parametrize("runtime", ALL)
def test_each_runtime_times_fp32_and_int8_interleaved_with_its_own_baseline(runtime: str, digits32) -> None:
    trained = _cnn(96).to(memory_format=torch.channels_last)  # as training leaves a search's baseline
    meter = CandidateMeter(trained, digits32, timer=LocalTimer(replace(FAST, runtime=runtime)), quantize=SMALL)
    meter.baseline_ms = meter.time_baseline().median_ms
    narrow = meter.time_model(_cnn(12), "fp32").record
    # A twelfth of the channels is far less work in any runtime: the ratio to the interleaved baseline shows it.
    assert narrow["ratio"] < 0.6, narrow
    assert narrow["corrected_ms"] == pytest.approx(narrow["ratio"] * meter.baseline_ms, rel=1e-3)
    int8 = meter.time_model(_cnn(96), "int8").record
    assert int8["precision"] == "int8" and int8["median_ms"] > 0 and int8["ratio"] > 0
    assert narrow.get("runtime", "onnxruntime") == runtime == int8.get("runtime", "onnxruntime")
    if runtime == "executorch":
        assert meter.baseline_onnx[4:6] == b"ET", "ExecuTorch times a .pte program, not ONNX"


@_needs("openvino")
def test_openvino_leaves_the_threads_signal_stack_as_it_found_it(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin swaps in a signal stack of its own while compiling and puts back the one it
    found when the model is freed: models freed out of order left a freed stack installed, and the next
    signal Python handled (a child exiting, with PyTorch's SIGCHLD handler) killed the process with SIGSEGV."""
    code = textwrap.dedent(
        """
        import gc, os, signal, threading
        import numpy as np, torch
        from search.measuring.onnx_export import export_onnx
        from search.measuring.runtimes.openvino import OpenVino
        from search.measuring.runtimes.signal_stack import current_signal_stack
        from tests.test_runtimes import _cnn

        onnx, x = export_onnx(_cnn(8), torch.zeros(1, 3, 32, 32)), np.zeros((1, 3, 32, 32), np.float32)
        before = current_signal_stack()
        assert before is not None and before[2] > 0, before  # faulthandler's stack (python -X faulthandler)
        first, second = OpenVino().load(onnx, 1), OpenVino().load(onnx, 1)
        first(x), second(x)
        del first  # freed in the order they were made, as an interleaved timing does
        gc.collect()
        del second
        gc.collect()
        assert current_signal_stack() == before, (current_signal_stack(), before)
        handled = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: handled.set())
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handled.wait(5)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@_needs("openvino")
def test_openvino_neither_forks_nor_starts_threads_to_send_telemetry() -> None:
    """``import openvino`` sends a usage event by forking the process from a thread pool; a fork taken while the
    timing worker read its pipe left a child hanging forever in its exit (orphaned workers after test runs), and a
    fork in the middle of a timing is noise. Loaded and run through the runtime seam, OpenVINO does neither."""
    code = textwrap.dedent(
        """
        import os, threading, time
        forks = []
        os.register_at_fork(before=lambda: forks.append(1))
        import numpy as np, torch
        from search.measuring.onnx_export import export_onnx
        from search.measuring.runtimes.openvino import OpenVino
        from tests.test_runtimes import _cnn

        assert OpenVino().unavailable() is None
        run = OpenVino().load(export_onnx(_cnn(8), torch.zeros(1, 3, 32, 32)), 1)
        run(np.zeros((1, 3, 32, 32), np.float32))
        time.sleep(1)  # the telemetry's thread forks within milliseconds of the import
        print(len(forks), sorted(t.name for t in threading.enumerate()))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0 ['MainThread']", done.stdout


def test_the_default_fingerprint_is_the_one_studies_always_recorded() -> None:
    default = fingerprint(1)
    assert "runtime" not in default and "onnxruntime" in default, "old studies resume unchanged"
    other = fingerprint(1, "openvino")
    assert other["runtime"] == "openvino" and "openvino" in other and "onnxruntime" not in other


def _old_study(folder: Path, name: str, hardware: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / name}.db", directions=["maximize"] * 2)
    study.set_user_attr("hardware", hardware)


@pytest.mark.parametrize("runtime", OPTIONAL)
def test_a_study_refuses_another_runtime_on_resume_in_one_line(runtime: str, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    _old_study(studies, "before", fingerprint(1))  # made before --runtime: ONNX Runtime
    _old_study(studies, "other", fingerprint(1, runtime))
    common = ("search", "--budget-ms", "30", "--data", "digits", "--input-size", "32", "--studies-dir", str(studies))
    done = run_main(*common, "--study", "before", "--runtime", runtime)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "was timed in onnxruntime" in done.stderr and "--runtime onnxruntime" in done.stderr
    done = run_main(*common, "--study", "other")  # the default runtime, on a study of another
    assert done.returncode == 2 and f"was timed in {runtime}" in done.stderr and f"--runtime {runtime}" in done.stderr


@pytest.mark.parametrize("runtime", ["openvino", "executorch"])
def test_a_missing_runtime_is_one_line_naming_what_to_install(
    runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.latency_service.options import argument_problem
    from search.latency_service.service import add_arguments

    engine = get_runtime(runtime)
    monkeypatch.setattr(type(engine), "unavailable", lambda self: f"ModuleNotFoundError: No module named '{runtime}'")
    model = tmp_path / "model.onnx"
    model.write_bytes(export_onnx(_cnn(8), torch.zeros(1, 3, 32, 32)))
    for argv in (
        ("bench", str(model), "--runtime", runtime),
        ("search", "--budget-ms", "30", "--runtime", runtime, "--studies-dir", str(tmp_path)),
    ):
        done = run_main(*argv)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f'pip install -e ".[{runtime}]"' in done.stderr and f"needs the {runtime} package" in done.stderr
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    problem = argument_problem(parser.parse_args(["--runtime", runtime]))  # cli.py target --runtime
    assert problem is not None and f'pip install "{engine.info.requirement}"' in problem


@pytest.mark.parametrize("runtime", OPTIONAL)
def test_shipped_runtime_files_pass_parity_and_a_broken_int8_file_is_refused(
    runtime: str, digits32, tmp_path: Path
) -> None:
    from search.progress import NullReporter
    from search.shipping.runtime_files import RuntimeCheckFailed, ship_runtime_files

    model = _cnn(16)
    fp32 = export_onnx(model, digits32.example_input(), dynamic_batch=True)
    int8 = quantize_onnx(fp32, calibration_batches(digits32, SMALL), SMALL)
    settings = ExportSettings(parity_images=32, test_images=48, min_int8_agreement=0.5)
    args = (fp32, int8, SMALL.to_dict(), digits32, "val", settings, tmp_path, 1, NullReporter())
    record = ship_runtime_files(runtime, model, *args)
    info = get_runtime(runtime).info
    assert (tmp_path / info.fp32_file).stat().st_size > 0 and (tmp_path / info.int8_file).stat().st_size > 0
    if runtime == "openvino":
        assert (tmp_path / "model.bin").stat().st_size > 0 and (tmp_path / "model.int8.bin").stat().st_size > 0
        from search.measuring.runtimes.openvino import read_model
        from search.serving.runtime_models import runtime_runner

        # Batch 1, the shape the search timed (a dynamic batch compiles to slower kernels); served in batches.
        for name in (info.fp32_file, info.int8_file):
            assert [d.get_length() for d in read_model(tmp_path / name).inputs[0].get_partial_shape()] == [1, 3, 32, 32]
        run = runtime_runner(runtime, tmp_path / info.fp32_file, 1, "test")
        x, _ = next(digits32.batches("test", 3, shuffle=False, augment=False))
        together = run(x.numpy())
        assert together.shape == (3, 10)
        np.testing.assert_allclose(together[2:], run(x.numpy()[2:]), rtol=1e-5, atol=1e-5)
    assert record is not None and record["parity"]["images"] == 32 and record["parity"]["top1_agreement"] >= 0.99
    assert record["int8"]["images"] == 48 and record["int8"]["top1_agreement_with_fp32"] >= 0.5
    # An INT8 file that cannot agree with its FP32 one (everything must agree) is refused, nothing said quietly.
    with pytest.raises(RuntimeCheckFailed, match=f"the {runtime} INT8 model agrees with its FP32 model on only"):
        strict = replace(settings, min_int8_agreement=1.01)
        ship_runtime_files(runtime, model, *args[:5], strict, *args[6:])


# --------------------------------------------------------------------------- end to end, in OpenVINO


@pytest.fixture(scope="module")
def openvino_study(tmp_path_factory: pytest.TempPathFactory, trained_weights: Path) -> SearchConfig:
    """A tiny study searched in OpenVINO: unpruned, uniform 0.5 (and unpruned INT8 where INT8 pays there)."""
    from search.study.run import run_search

    if get_runtime("openvino").unavailable():
        pytest.skip('openvino is not installed; pip install -e ".[openvino]"')
    root = tmp_path_factory.mktemp("openvino")
    weights = root / "baseline.pth"
    shutil.copyfile(trained_weights, weights)
    space = root / "space.toml"
    text = (ROOT / "spaces" / "resnet18.toml").read_text()
    space.write_text(re.sub(r"(?m)^uniform_ratios = .*$", "uniform_ratios = [0.5]", text))
    config = SearchConfig(
        budget_ms=1e6,
        weights=str(weights),
        data=DataSpec("digits", input_size=32),
        space=str(space),
        study="ov",
        trials=3,
        finetune_steps=2,
        bn_batches=2,
        runtime="openvino",
        precisions=("fp32",),  # OpenVINO's INT8 files are checked above; this is the flow, kept short
        studies_dir=str(root / "studies"),
    )
    run_search(config)
    return config


@pytest.mark.slow
def test_an_openvino_study_exports_benches_and_serves_its_ir(openvino_study: SearchConfig, digits32) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from search.cli.bench import _measure
    from search.measuring.runtimes.openvino import OpenVino
    from search.serving.app import Limits, create_app
    from search.serving.models import load_export
    from search.shipping.export import export_trial
    from search.shipping.rebuild import load_study_baseline

    study = optuna.load_study(study_name="ov", storage=openvino_study.storage_url)
    assert study.user_attrs["hardware"]["runtime"] == "openvino"
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert all(t.user_attrs["latency"]["runtime"] == "openvino" for t in trials)
    pruned = next(t.number for t in trials if t.user_attrs.get("recipe") == "uniform 0.5 l1")
    out = Path(openvino_study.studies_dir).parent / "export" / f"trial-{pruned}"
    card = export_trial(
        load_study_baseline(study), pruned, ExportSettings(steps=4, parity_images=32), out, command="export"
    )
    assert card["latency"]["runtime_name"] == "openvino" and card["hardware"]["runtime"] == "openvino"
    assert card["runtime_files"]["parity"]["top1_agreement"] >= 0.99
    for name in ("model.onnx", "model.xml", "model.bin", "card.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "card.json").read_text())["files"]["model.xml"] > 0

    shape, timed = _measure(str(out / "model.xml"), None, 1)  # bench model.xml: OpenVINO, from the suffix
    assert shape == (1, 3, 32, 32) and timed.median_ms > 0

    served = load_export(out, threads=1)  # the card says openvino: its IR is served
    assert served.runtime == "openvino" and served.file == "model.xml"
    pixels = digits32.test.images[0].permute(1, 2, 0).numpy()
    buffer = __import__("io").BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with TestClient(create_app([served], Limits(slots=2))) as client:
        answer = client.post("/predict", files={"image": ("d.png", buffer.getvalue(), "image/png")}).json()
    x, _ = next(digits32.batches("test", 1, shuffle=False, augment=False))
    expected = OpenVino().load(str(out / "model.xml"), 1)(x.numpy())
    assert answer["models"][0]["top"][0]["index"] == int(np.argmax(expected)), answer

    if get_runtime("executorch").unavailable() is None:
        with pytest.raises(UsageError, match="was exported for openvino; serve it with --runtime openvino"):
            load_export(out, threads=1, runtime="executorch")


# --------------------------------------------------------------------------- the latency target


@pytest.mark.parametrize("runtime", OPTIONAL)
def test_the_latency_target_times_in_its_runtime(runtime: str, tmp_path: Path) -> None:
    import os
    import sys

    from tests.test_target import _no_torch_env, _start

    token_file = tmp_path / "token"
    argv = [sys.executable, "-m", "search.latency_service", "--token-file", str(token_file), "--port", "0"]
    # The device installs only the runtime it times with: OpenVINO's target runs without torch and onnxruntime.
    env = _no_torch_env(tmp_path) if runtime == "openvino" else {**os.environ, "PYTHONPATH": str(ROOT)}
    if runtime == "openvino":
        shim = tmp_path / "absent-packages" / "onnxruntime"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text("raise ImportError('onnxruntime is not installed on this device')\n")
    target = _start([*argv, "--runtime", runtime], env, token_file)
    try:
        _time_on(target.url, target.token, runtime)
    finally:
        target.stop()


def _time_on(url: str, token: str, runtime: str) -> None:
    from search.latency_service.client import RemoteTimer

    timer = RemoteTimer(url, token)
    info = timer.connect()
    assert info["runtime"] == runtime == timer.runtime and info["fingerprint"]["runtime"] == runtime
    example = torch.zeros(1, 3, 32, 32)
    if runtime == "executorch":
        from search.measuring.runtimes.lowering import lower_pte

        wide, narrow = lower_pte(_cnn(96), example), lower_pte(_cnn(12), example)
    else:
        wide, narrow = export_onnx(_cnn(96), example), export_onnx(_cnn(12), example)
    timed = timer.time(narrow, (1, 3, 32, 32), reference=wide)
    assert timed.ratio is not None and timed.ratio < 0.6

"""Shared fixtures: tiny but real settings (real ResNet-18 shapes, real ONNX Runtime, real SQLite)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# Tests time tiny models, and each timing would last the product's floor of 1 s (search.measuring.timing's
# DEFAULT_MIN_SECONDS); the floor itself is tested in test_latency.py with this variable unset. Set here, at
# import, so module-level settings and the CLI subprocesses tests start see it too.
MIN_TIMING_ENV = "PRUNE_SEARCH_MIN_TIMING_S"
os.environ[MIN_TIMING_ENV] = "0"
# Searches end by timing their front again in fresh processes (search.study.confirm): a few seconds each, and
# it can drop a short search's only candidates at the budget's edge. tests/test_confirm.py passes
# --confirm-repeats itself; every other search in the suite keeps the one timing, as before the feature.
os.environ["PRUNE_SEARCH_CONFIRM_REPEATS"] = "0"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    """``cli.py`` in this process (no second torch import): exit status, stdout and stderr as a run would give."""
    from search.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["cli.py", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded images go to a folder of this test session, never to the user's cache."""
    from search.data.cache import DECODED_CACHE_ENV

    folder = tmp_path_factory.mktemp("decoded-cache")
    saved = os.environ.get(DECODED_CACHE_ENV)
    os.environ[DECODED_CACHE_ENV] = str(folder)  # also for the CLI subprocesses tests start
    yield folder
    if saved is None:
        os.environ.pop(DECODED_CACHE_ENV, None)
    else:
        os.environ[DECODED_CACHE_ENV] = saved


@pytest.fixture(scope="session")
def digits32():
    """The built-in digits data at 32x32: real images, tiny compute."""
    from search.data.loading import load_dataset
    from search.data.spec import DataSpec

    return load_dataset(DataSpec("digits", input_size=32))


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory: pytest.TempPathFactory, digits32) -> Path:
    """A resnet18 state_dict trained briefly on digits at 32x32, as a user would bring it."""
    import torch

    from search.models.build import build_model
    from search.training.finetune import TrainSettings, train

    torch.manual_seed(0)  # the same weights in every session: tests that depend on them do not flicker
    model = build_model("resnet18", digits32.num_classes)
    train(model, digits32, TrainSettings(steps=40, batch_size=32, lr=0.05))
    path = tmp_path_factory.mktemp("weights") / "resnet18_digits32.pth"
    torch.save(model.state_dict(), path)
    return path

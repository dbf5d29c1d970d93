"""Measuring a candidate: every timing goes through one timer, records are reused for the same architecture."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torchvision

from search.measuring.candidate import CandidateMeter, Known, LocalTimer
from search.measuring.timing import Latency, LatencySettings
from search.pruning.space import SPACES_DIR, load_space
from tests.conftest import ROOT

FAST = LatencySettings(threads=1, warmup=2, round_size=5, min_rounds=2, max_seconds=5)
SPACE = load_space(SPACES_DIR / "resnet18.toml").with_precisions(("fp32",))


@dataclass
class CountingTimer:
    """A real local timer that also counts what it was asked to time (the seam a remote timer plugs into)."""

    inner: LocalTimer = field(default_factory=lambda: LocalTimer(FAST))
    calls: list[bool] = field(default_factory=list)
    """Whether each timing was interleaved with a reference."""

    @property
    def threads(self) -> int:
        return self.inner.threads

    @property
    def where(self) -> str:
        return "counted"

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def time(self, onnx_model: bytes | str, input_shape: tuple[int, ...], *, reference: bytes | None = None) -> Latency:
        self.calls.append(reference is not None)
        return self.inner.time(onnx_model, input_shape, reference=reference)


@pytest.fixture(scope="module")
def meter(digits32) -> CandidateMeter:
    baseline = torchvision.models.resnet18(num_classes=digits32.num_classes).eval()
    return CandidateMeter(baseline, digits32, space=SPACE, timer=CountingTimer())


def test_policies_are_pruned_timed_against_the_baseline_and_judged_by_the_corrected_latency(meter) -> None:
    timer = meter.timer
    base = meter.time_baseline()
    meter.baseline_ms = base.median_ms
    record = meter.record(SPACE.uniform(0.7))
    assert timer.calls == [False, True], "the baseline alone, then the candidate interleaved with it"
    assert record["arch_hash"] and record["precision"] == "fp32" and record["threads"] == 1
    assert record["measured_on"] == "counted", "each record says where it was measured"
    assert record["ratio"] < 0.8, "removing 70% of the channels is measured faster"
    assert record["corrected_ms"] == pytest.approx(record["ratio"] * base.median_ms, rel=1e-3)


def test_a_known_record_of_the_same_architecture_is_reused_not_timed_again(meter) -> None:
    meter.baseline_ms = meter.baseline_ms or meter.time_baseline().median_ms
    timer = meter.timer
    stored = {"median_ms": 1.0, "ratio": 0.5, "corrected_ms": 2.0, "precision": "fp32", "arch_hash": "abc"}
    other_arch = Known("xyz", "fp32", {**stored, "arch_hash": "xyz"}, {"reused_from_trial": 3})
    other_precision = Known("abc", "int8", stored, {"reused_from_trial": 4})
    same = Known("abc", "fp32", stored, {"measured_at": "study creation"})
    before = len(timer.calls)
    model = torchvision.models.resnet18(num_classes=10)
    timed = meter.time_pruned(model, "abc", "fp32", [other_arch, other_precision, same])
    assert len(timer.calls) == before, "nothing was timed"
    assert timed.record == {k: v for k, v in stored.items() if k != "arch_hash"} | {"measured_at": "study creation"}

    fresh = meter.time_pruned(model.eval(), "new", "fp32", [other_arch, same])
    assert len(timer.calls) == before + 1 and "measured_at" not in fresh.record, "an unknown architecture is timed"


def test_the_timing_module_runs_without_torch() -> None:
    """What a latency target device needs: ONNX Runtime and numpy, not PyTorch."""
    code = "import sys, search.measuring.timing; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

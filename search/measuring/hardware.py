"""Where a measurement was taken: CPU, threads and library versions.

Latency is only comparable between like machines, so every trial and every study records
this fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.measuring.timing import LatencySettings

__all__ = [
    "OnThisMachine",
    "cpu_flags",
    "fingerprint",
    "fingerprint_id",
    "git_revision",
    "package_versions",
    "supports_bf16",
]

_INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            info.setdefault(key, value)
    return info


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def supports_bf16() -> bool:
    """True when the CPU computes bf16 natively; elsewhere bf16 autocast is emulated and much slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "torch-pruning", "onnxruntime", "onnx", "optuna", "openvino", "executorch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            if name not in ("openvino", "executorch"):  # optional: named only where installed
                versions[name] = "missing"
    return versions


def fingerprint(threads: int, runtime: str = "onnxruntime") -> dict[str, Any]:
    """What decides a latency measurement: CPU model and features, cores, threads, runtime.

    The default runtime's fingerprint is the one studies recorded before ``--runtime`` existed (no
    ``runtime`` key, its version under ``onnxruntime``), so they resume unchanged; another runtime
    adds ``runtime`` and that package's version instead.
    """
    from importlib.metadata import PackageNotFoundError, version

    print_ = {
        "cpu": cpu_model(),
        "cpu_flags": sorted(f for f in _INTERESTING_FLAGS if f in cpu_flags()),
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "threads": threads,
    }
    if runtime != "onnxruntime":
        print_["runtime"] = runtime
    try:
        print_[runtime] = version(runtime)
    except PackageNotFoundError:
        print_[runtime] = "missing"
    return print_


def fingerprint_id(print_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:12]


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class OnThisMachine:
    """What a timer on this machine's CPU says about itself, from its ``settings``: threads, runtime, where
    (``local``: every record of such a timer says so) and this machine's fingerprint. Shared by
    :class:`search.measuring.candidate.LocalTimer` (in-process) and
    :class:`search.measuring.isolated.IsolatedTimer` (in a child process): the machine is the same."""

    settings: LatencySettings

    @property
    def threads(self) -> int:
        return self.settings.threads

    @property
    def runtime(self) -> str:
        return self.settings.runtime

    @property
    def where(self) -> str:
        return "local"

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.settings.threads, self.settings.runtime)

    def with_settings(self, settings: LatencySettings) -> OnThisMachine:
        """This timer timing with other rounds (threads and runtime stay)."""
        raise NotImplementedError

"""The runtimes by name, and the one-line error for one that is not installed."""

from __future__ import annotations

from typing import Any

from search.errors import UsageError
from search.measuring.runtimes.base import Runtime
from search.measuring.runtimes.executorch import ExecuTorch
from search.measuring.runtimes.onnxruntime import OnnxRuntime
from search.measuring.runtimes.openvino import OpenVino

__all__ = ["DEFAULT_RUNTIME", "RUNTIME_NAMES", "get_runtime", "require_runtime", "study_runtime"]

DEFAULT_RUNTIME = "onnxruntime"
"""What a study that records no runtime was timed in (every study made before ``--runtime``)."""

_RUNTIMES: dict[str, Runtime] = {r.info.name: r for r in (OnnxRuntime(), OpenVino(), ExecuTorch())}
RUNTIME_NAMES: tuple[str, ...] = tuple(_RUNTIMES)


def get_runtime(name: str | None) -> Runtime:
    """The runtime called ``name`` (None: the default), whether or not it is installed."""
    runtime = _RUNTIMES.get(name or DEFAULT_RUNTIME)
    if runtime is None:
        raise UsageError(f"unknown runtime {name!r}; --runtime takes {', '.join(RUNTIME_NAMES)}")
    return runtime


def require_runtime(name: str | None) -> Runtime:
    """The runtime called ``name``, or a one-line :class:`UsageError` naming the package to install."""
    runtime = get_runtime(name)
    problem = runtime.unavailable()
    if problem is not None:
        info = runtime.info
        raise UsageError(
            f"--runtime {info.name} needs the {info.package} package, which cannot be imported here ({problem}); "
            f"install it: {info.install_hint()}"
        )
    return runtime


def study_runtime(study: Any) -> str:
    """The runtime a study's latencies were measured in (a study from before ``--runtime``: ONNX Runtime)."""
    return (study.user_attrs.get("hardware") or {}).get("runtime", DEFAULT_RUNTIME)

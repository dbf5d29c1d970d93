"""ExecuTorch with the XNNPACK backend: a ``.pte`` program, run by ExecuTorch's own runtime.

The program is lowered from the PyTorch model (:mod:`search.measuring.runtimes.lowering`), not
from ONNX. XNNPACK's thread pool is process-wide: it is sized to the timing's threads before a
program is loaded. ExecuTorch's runtime takes and returns torch tensors, so it needs PyTorch
(a dependency of the ``executorch`` package).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from search.measuring.runtimes.base import Run, RuntimeInfo, import_problem

__all__ = ["EXECUTORCH", "PTE_MAGIC", "ExecuTorch", "load_method"]

EXECUTORCH = RuntimeInfo(
    name="executorch",
    package="executorch",
    requirement="executorch>=1.5,<2",
    extra="executorch",
    module="executorch.runtime",
    file_format="pte",
    fp32_file="model.pte",
    int8_file="model.int8.pte",
    label="executorch XNNPACK",
)

PTE_MAGIC = b"ET"
"""A ``.pte`` file's flatbuffer identifier starts at byte 4 with these (``ET12`` in 1.x)."""


_ALIVE: weakref.WeakSet[_Loaded] = weakref.WeakSet()
"""Methods loaded in this process: XNNPACK's thread pool must not be replaced under them (it crashes)."""


class _Loaded:
    """A program's ``forward`` method with what it points into: the program and its bytes must outlive it
    (a method whose program was collected crashes the process when it runs)."""

    def __init__(self, data: bytes, program: Any, method: Any) -> None:
        self.data, self.program, self.method = data, program, method

    @property
    def metadata(self) -> Any:
        return self.method.metadata

    def execute(self, inputs: list[Any]) -> Any:
        return self.method.execute(inputs)


def load_method(model: bytes | str | Path, threads: int | None) -> _Loaded:
    """The program's ``forward`` method, loaded with XNNPACK's thread pool at ``threads`` threads
    (None: as it is, e.g. to read the program's metadata)."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    # resetting it logs a line each time
    if threads is not None and portable_lib._threadpool_get_thread_count() != threads:
        gc.collect()  # methods nobody holds any more go first
        if len(_ALIVE):
            raise RuntimeError(
                f"ExecuTorch's thread pool is process-wide and {len(_ALIVE)} loaded program(s) use "
                f"{portable_lib._threadpool_get_thread_count()} threads; time with {threads} in another process"
            )
        portable_lib._unsafe_reset_threadpool(threads)
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    if data[4:6] != PTE_MAGIC:
        raise ValueError("not an ExecuTorch program (.pte)")
    program = Runtime.get().load_program(data)
    loaded = _Loaded(data, program, program.load_method("forward"))
    _ALIVE.add(loaded)
    return loaded


class ExecuTorch:
    info = EXECUTORCH

    def unavailable(self) -> str | None:
        return import_problem(self.info.module)

    def load(self, model: bytes | str, threads: int) -> Run:
        import torch

        method = load_method(model, threads)

        def run(batch: np.ndarray) -> np.ndarray:
            return method.execute([torch.from_numpy(np.ascontiguousarray(batch))])[0].numpy()

        return run

    def input_shape(self, model: bytes | str) -> list[int | str]:
        loaded = load_method(model, None)  # held while its metadata is read: the metadata points into it
        meta = loaded.metadata.input_tensor_meta(0)
        shape = [int(d) for d in meta.sizes()]
        del meta, loaded
        return shape

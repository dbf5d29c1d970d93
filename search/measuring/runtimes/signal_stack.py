"""Keep a thread's alternate signal stack when a native library swaps in one of its own.

OpenVINO's CPU plugin installs a signal stack of its own on the thread that compiles a model and
puts back the one it found when that model is destroyed. Models destroyed in another order than
they were compiled (a candidate timed interleaved with its baseline, then both dropped) leave the
thread with the stack of a model already freed. The next signal handled on that thread then writes
its frame into freed memory: Python runs every handler of its own on the alternate stack (Ctrl-C,
and the SIGCHLD handler PyTorch's DataLoader installs), so a child process exiting killed the
whole process with SIGSEGV (``si_code`` SI_KERNEL), or silently corrupted the heap.

:func:`kept_signal_stack` reads the calling thread's stack before such a call and puts it back
after, so the library's stack never outlives the call; what the library puts back later (on
destruction) is then that same stack. Linux only (``stack_t``'s layout differs elsewhere), a no-op
elsewhere.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["current_signal_stack", "kept_signal_stack"]


class _StackT(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_SS_ONSTACK = 1
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
    except (OSError, AttributeError):
        _libc = None


def current_signal_stack() -> tuple[int, int, int] | None:
    """The calling thread's alternate signal stack: (address, flags, size); None where it cannot be read."""
    if _libc is None:
        return None
    stack = _StackT()
    if _libc.sigaltstack(None, ctypes.byref(stack)) != 0:
        return None
    return (stack.ss_sp or 0, stack.ss_flags & ~_SS_ONSTACK, stack.ss_size)


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the body, then give the calling thread back the alternate signal stack it had before."""
    if _libc is None:
        yield
        return
    before = _StackT()
    known = _libc.sigaltstack(None, ctypes.byref(before)) == 0 and not before.ss_flags & _SS_ONSTACK
    try:
        yield
    finally:
        if known:
            _libc.sigaltstack(ctypes.byref(before), None)

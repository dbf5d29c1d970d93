"""The spellings ``--device`` accepts, checked without importing torch (the CLI checks its options first)."""

from __future__ import annotations

import re

__all__ = ["DEVICE_FORMS", "normalise_device"]

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def normalise_device(text: str) -> str | None:
    """``text`` trimmed and in lower case when it is one of :data:`DEVICE_FORMS`, else None."""
    value = text.strip().lower()
    return value if _PATTERN.match(value) else None

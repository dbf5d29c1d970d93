"""Write one ``## Section`` of BENCHMARKS.md, keeping the others (each benchmark owns its section)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nMeasured on the 2-core development machine; every script in `benchmarks/` rewrites its own "
    "section. Latencies are ONNX Runtime unless a section names another runtime, batch 1, medians; speeds are "
    "compared as ratios measured side by side "
    "in one run.\n"
)


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the section headed ``## title`` (or append it) with ``body``."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")

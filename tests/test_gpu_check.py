"""benchmarks/gpu_check.py on a machine without CUDA: one line saying it skipped and why, exit status 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_skips_with_its_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this runs alike everywhere
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("gpu_check: skipped:")
    assert "CUDA" in lines[0]
    assert not out.exists()
    assert not (tmp_path / "work").exists()  # nothing installed or created

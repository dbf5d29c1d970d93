"""Benchmark: the README's default run, from nothing, timed end to end.

Runs ``python cli.py search --budget-ms 30`` (no other options) with a fresh, empty studies
folder, so the baseline is trained as on a new machine, and writes what it took and found to
``benchmarks/default_run.json`` and the "Default run" section of BENCHMARKS.md.

    python benchmarks/default_run.py          # about 15 minutes on the 2-core dev machine
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.report import recommended, rows  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        log = ROOT / "benchmarks" / "default_run.log"
        started = time.perf_counter()
        with log.open("w") as out:
            code = subprocess.call(
                [sys.executable, "cli.py", "search", "--budget-ms", "30", "--studies-dir", str(studies)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name="resnet18-digits-30ms", storage=f"sqlite:///{studies}/resnet18-digits-30ms.db")
        all_rows = rows(study)
        best = recommended(all_rows)
        attrs = study.user_attrs
        result = {
            "command": "python cli.py search --budget-ms 30",
            "exit_code": code,
            "wall_seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d"),
            "git_revision": git_revision(),
            "hardware": fingerprint(1),
            "versions": package_versions(),
            "baseline_latency_ms": round(attrs["baseline_latency_ms"], 2),
            "baseline_accuracy": round(attrs["baseline_accuracy"], 4),
            "fastest_policy_ms": round(attrs["fastest_policy_ms"], 2),
            "trials": len(all_rows),
            "within_budget": sum(r.feasible for r in all_rows),
            "recommended": None if best is None else {
                "trial": best.number, "accuracy": round(best.accuracy or 0, 4), "latency_ms": round(best.latency_ms, 2),
                "ratio": round(best.ratio, 3), "policy": best.policy.describe(), "recipe": best.recipe,
            },
            "rows": [r.to_dict() for r in all_rows],
        }
    (ROOT / "benchmarks" / "default_run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()

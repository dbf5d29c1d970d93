"""Benchmark: the README's default run, from nothing, timed end to end.

Runs ``python cli.py search --budget-ms 30`` (no other options) with a fresh, empty studies
folder, so the baseline is trained as on a new machine, and writes what it took and found to
``benchmarks/default_run.json`` and the "Default run" section of BENCHMARKS.md.

    python benchmarks/default_run.py          # about 15 minutes on the 2-core dev machine
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.study.front import recommended, rows  # noqa: E402

STUDIES = ROOT / "benchmarks" / ".default-studies"
"""Kept after the run (git-ignored) so benchmarks/export_default.py can export its recommended policy."""


def main() -> None:
    shutil.rmtree(STUDIES, ignore_errors=True)  # a fresh machine: no cached baseline, no study
    log = ROOT / "benchmarks" / "default_run.log"
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "cli.py", "search", "--budget-ms", "30", "--studies-dir", str(STUDIES)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="resnet18-digits-30ms", storage=f"sqlite:///{STUDIES}/resnet18-digits-30ms.db")
    all_rows = rows(study)
    best = recommended(all_rows)
    attrs = study.user_attrs
    phases: dict[str, float] = {}
    for t in study.trials:
        for phase, value in t.user_attrs.get("seconds", {}).items():
            phases[phase] = phases.get(phase, 0.0) + value
    result = {
        "command": "python cli.py search --budget-ms 30",
        "exit_code": code,
        "wall_seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
        "baseline_train_seconds": _baseline_seconds(log),
        "baseline_latency_ms": round(attrs["baseline_latency_ms"], 2),
        "baseline_accuracy": round(attrs["baseline_accuracy"], 4),
        "fastest_policy_ms": round(attrs["fastest_policy_ms"], 2),
        "trials": len(all_rows),
        "within_budget": sum(r.feasible for r in all_rows),
        "trial_seconds_by_phase": {k: round(v, 1) for k, v in phases.items()},
        "recommended": None
        if best is None
        else {
            "trial": best.number,
            "accuracy": round(best.accuracy or 0, 4),
            "latency_ms": round(best.latency_ms, 2),
            "ratio": round(best.ratio, 3),
            "policy": best.policy.describe(),
            "recipe": best.recipe,
        },
        "rows": [r.to_dict() for r in all_rows],
    }
    (ROOT / "benchmarks" / "default_run.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section("Default run", _section(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


def _baseline_seconds(log: Path) -> float | None:
    for line in log.read_text().splitlines():
        if line.startswith("Baseline: trained in "):
            return float(line.split()[3])
    return None


def _section(r: dict) -> str:
    best = r["recommended"]
    lines = [
        f"`{r['command']}` from nothing (no cached baseline, new study), {r['date']}, commit "
        f"`{(r['git_revision'] or 'unknown')[:10]}`, {r['hardware']['cpu']} ({r['hardware']['logical_cpus']} "
        f"cores, flags {', '.join(r['hardware']['cpu_flags']) or 'none'}), onnxruntime {r['hardware']['onnxruntime']}.",
        "",
        "| what | measured |",
        "| --- | --- |",
        f"| whole run, wall clock | **{r['wall_seconds'] / 60:.1f} min** (target: 15 min) |",
        f"| baseline training (ResNet-18, 224x224 digits, 3 epochs) | {r['baseline_train_seconds']} s |",
        f"| baseline top-1 (val) / latency | {r['baseline_accuracy']:.2%} / {r['baseline_latency_ms']} ms |",
        f"| fastest policy the space reaches | {r['fastest_policy_ms']} ms |",
        f"| trials / within the 30 ms budget | {r['trials']} / {r['within_budget']} |",
        f"| seconds in trial phases | {', '.join(f'{k} {v:.0f}' for k, v in r['trial_seconds_by_phase'].items())} |",
    ]
    if best:
        lines.append(
            f"| recommended | trial {best['trial']} ({best['recipe'] or 'searched'}): top-1 {best['accuracy']:.2%} "
            f"at {best['latency_ms']} ms ({best['ratio']:.0%} of the baseline) |"
        )
    lines += ["", "Raw numbers: `benchmarks/default_run.json`; console output: `benchmarks/default_run.log`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

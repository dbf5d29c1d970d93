"""Benchmark: does removing whole residual blocks beat channel pruning at the same latency on CIFAR-10?

A question left by the CIFAR-10 benchmark (``benchmarks/cifar10.py``): there, every policy at a
given latency ended within about 1 pp of the others after the final fine-tune, so a searched
policy could only pull ahead of the recipes with moves the recipes cannot make. Removing blocks
is such a move. This script measures whether it pays before the search space gets it.

Per budget (50% and 25% of the baseline's latency) and per set of removed blocks (the second
block of layer4; of layer3 and layer4; of layer2 to layer4; of every stage), the remaining
channels are pruned uniformly (L1) at the smallest ratio on a 0.05 grid whose latency meets the
budget. Each model gets exactly the final fine-tune of the CIFAR-10 benchmark's rows (same
steps, lr, distillation, seeds) and is compared with that benchmark's recipe rows, which come
from its cache or are computed the same way. Latencies are re-measured at the end, each model
interleaved with the baseline.

    python benchmarks/cifar10_depth.py > benchmarks/cifar10_depth.log 2>&1     # about 25 min here

Shares ``benchmarks/.cifar10`` with the CIFAR-10 benchmark. Writes ``benchmarks/cifar10_depth.json``
and the "CIFAR-10: removing blocks" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cifar10 import DATA, RECIPES, WEIGHTS, Bench, Plan, log, pct, row  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision  # noqa: E402

SECTION = "CIFAR-10: removing blocks"
DROPS: tuple[tuple[str, ...], ...] = (
    ("layer4",),
    ("layer3", "layer4"),
    ("layer2", "layer3", "layer4"),
    ("layer1", "layer2", "layer3", "layer4"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cifar10"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=float, default=0.1, help="final fine-tune epochs of every row")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from cifar10_depth.json")
    args = parser.parse_args()
    if args.render:
        write_section(SECTION, render(json.loads((ROOT / "benchmarks" / "cifar10_depth.json").read_text())))
        return
    if not DATA.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"error: this benchmark needs {DATA} and {WEIGHTS} (the shared CIFAR-10 material); not found")
    started = time.perf_counter()
    plan = Plan((), (), 0, 0, 0, 0, 0, args.epochs, tuple(args.seeds), 0)
    bench = Bench(plan, Path(args.work))
    budgets = []
    for fraction in args.budgets:
        rows: list[dict[str, Any]] = []
        for kind, label in RECIPES:
            ratio = bench.ratio_meeting(kind, fraction, "fp32")
            if ratio is not None:
                runs = [bench.recipe(kind, ratio, "fp32", seed) for seed in plan.seeds]
                rows.append(row(f"{label} r={ratio:g}", runs, kind="recipe"))
        for drop in DROPS:
            ratio = bench.ratio_meeting("uniform", fraction, "fp32", drop)
            if ratio is None:
                continue
            runs = [bench.recipe("uniform", ratio, "fp32", seed, drop) for seed in plan.seeds]
            blocks = ", ".join(f"{stage}.1" for stage in drop)
            rows.append(row(f"without {blocks}; uniform L1 r={ratio:g}", runs, kind="blocks removed"))
        budgets.append({"fraction": fraction, "rows": rows})
    log("measuring every row's latency side by side with the baseline")
    for r in [r for b in budgets for r in b["rows"]]:
        got = bench.meter.time_onnx(r["onnx"])
        r["latency_ms"], r["latency_fraction"] = got.median_ms, got.ratio
    result = {
        "budgets": budgets,
        "finetune_steps": bench.finetune_steps,
        "seeds": plan.seeds,
        "seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
    }
    (ROOT / "benchmarks" / "cifar10_depth.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, render(result))
    log(f"done in {result['seconds'] / 60:.1f} min")


def render(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        f"`python benchmarks/cifar10_depth.py` on {result['date']}, commit `{result['git_revision']}`, "
        f"{hw.get('cpu')}; {result['seconds'] / 60:.0f} min. The CIFAR-10 setting above; every row gets the same "
        f"final fine-tune ({result['finetune_steps']} steps, distillation 0.5, seeds "
        f"{', '.join(str(s) for s in result['seeds'])}; test top-1 mean ± spread). A removed block `layerN.1` is "
        "the stage's second residual block, replaced by the identity; the channels left are then pruned "
        "uniformly at the smallest ratio that meets the budget. Latencies measured at the end, interleaved "
        "with the baseline.",
        "",
    ]
    for b in result["budgets"]:
        recipes = [r for r in b["rows"] if r["kind"] == "recipe"]
        best = max(recipes, key=lambda r: r["mean"]) if recipes else None
        lines += [
            f"### Budget {100 * b['fraction']:g}%",
            "",
            "| row | test top-1 % (mean ± spread) | of baseline | MACs M | params M | − best recipe (pp) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in b["rows"]:
            gain = f"{100 * (r['mean'] - best['mean']):+.2f}" if best and r is not best else ""
            lines.append(
                f"| {r['row']} | {pct(r['mean'])} ± {pct(r['spread'])} | {r['latency_fraction']:.3f} "
                f"| {r['macs'] / 1e6:.1f} | {r['params'] / 1e6:.2f} | {gain} |"
            )
        lines.append("")
    notes = ROOT / "benchmarks" / "cifar10_depth_notes.md"  # the reading of the numbers, written by a person
    if notes.exists():
        lines += [notes.read_text().strip()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

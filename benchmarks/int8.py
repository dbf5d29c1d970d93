"""Benchmark: what INT8 gives on this machine, and pruning searched with and without it, in one run.

Side by side, on the same baseline, budget and machine state:

1. the FP32 baseline: latency (ONNX Runtime, 1 thread, batch 1) and top-1 on val;
2. the INT8 baseline: the same model statically quantized (QDQ, per-channel INT8 weights, MinMax
   calibration on 256 training images), timed interleaved with the FP32 model, top-1 run in
   ONNX Runtime, and its top-1 agreement with the FP32 model;
3. the best policy within the budget of a search with ``--precision fp32``;
4. the best policy within the budget of a search with ``--precision fp32,int8`` (which keeps INT8
   only if the INT8 baseline is measured faster here; the decision is reported).

Setting: ResNet-18 at 64x64 on the built-in digits (baseline trained here), budget half the
FP32 baseline's latency, a few trials per search so the whole run takes about ten minutes on
the 2-core development machine. With ``--cifar`` and ``../shared`` present it also quantizes the
shared CIFAR-10 ResNet-18 (no search): FP32 and INT8 latency and top-1 on its 5,000 val images.

    python benchmarks/int8.py [--trials 9] [--cifar]   > benchmarks/int8.log

Writes ``benchmarks/int8.json`` and the "INT8" section of BENCHMARKS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.measuring.candidate import CandidateMeter, LocalTimer  # noqa: E402
from search.measuring.hardware import cpu_flags, fingerprint, git_revision, package_versions  # noqa: E402
from search.measuring.onnx_export import fix_batch  # noqa: E402
from search.measuring.quantize import QuantizeSettings, quantize_model  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.study.config import SearchConfig  # noqa: E402
from search.study.front import pareto_front, recommended, rows  # noqa: E402
from search.study.run import run_search  # noqa: E402
from search.training.baseline import prepare_baseline  # noqa: E402
from search.training.evaluate import compare_top1, top1  # noqa: E402

SECTION = "INT8"


class LogReporter:
    """Log lines with the elapsed time; progress bars are left out."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def _line(self, kind: str, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {kind}{message}", flush=True)

    def info(self, message: str) -> None:
        self._line("", message)

    def warn(self, message: str) -> None:
        self._line("warning: ", message)

    def phase(self, name: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int | None) -> Any:
        class _Task:
            def advance(self, steps: int = 1, **fields: Any) -> None:
                pass

        yield _Task()


def baselines(model: torch.nn.Module, data: Any, settings: QuantizeSettings, reporter: LogReporter) -> dict[str, Any]:
    """FP32 and INT8 versions of ``model``: interleaved latency, top-1 (INT8 in ONNX Runtime), agreement."""
    quantized = quantize_model(model, data, settings)
    meter = CandidateMeter(model, data, timer=LocalTimer(LatencySettings(threads=1)))  # FP32 static export as reference
    timed = meter.time_onnx(fix_batch(quantized.int8_onnx, 1))
    agreement = compare_top1(quantized.fp32_onnx, quantized.int8_onnx, data, "val")
    result = {
        "fp32": {
            "latency_ms": round(timed.reference_median_ms or 0.0, 3),
            "top1_pytorch": round(top1(model, data, "val"), 4),
            "top1_onnxruntime": round(agreement.top1_a, 4),
        },
        "int8": {
            "latency_ms": round(timed.median_ms, 3),
            "ratio_to_fp32": round(timed.ratio or 0.0, 3),
            "top1_onnxruntime": round(agreement.top1_b, 4),
            "top1_agreement_with_fp32": round(agreement.agreement, 4),
            "quantize_seconds": round(quantized.seconds, 1),
            "onnx_bytes": len(quantized.int8_onnx),
        },
        "fp32_onnx_bytes": len(quantized.fp32_onnx),
        "val_images": agreement.images,
    }
    reporter.info(f"baselines: {json.dumps(result)}")
    return result


def best_of(study: Any) -> dict[str, Any] | None:
    best = recommended(rows(study))
    if best is None:
        return None
    attrs = study.trials[best.number].user_attrs
    return {
        "trial": best.number,
        "precision": best.precision,
        "accuracy": round(best.accuracy or 0.0, 4),
        "accuracy_fp32_after_finetune": attrs.get("accuracy_fp32"),
        "latency_ms": round(best.latency_ms, 3),
        "ratio": round(best.ratio, 3),
        "policy": best.policy.describe(),
        "recipe": best.recipe,
    }


def search(config: SearchConfig, reporter: LogReporter) -> dict[str, Any]:
    started = time.perf_counter()
    study = run_search(config, reporter).study
    all_rows = rows(study)
    return {
        "precision_flag": ",".join(config.precisions),
        "searched_precisions": study.user_attrs.get("precisions"),
        "int8_check": study.user_attrs.get("int8_check"),
        "trials": len(all_rows),
        "within_budget": sum(r.feasible for r in all_rows),
        "int8_trials": sum(r.precision == "int8" for r in all_rows),
        "front": [r.to_dict() for r in pareto_front(all_rows)],
        "best": best_of(study),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [r.to_dict() for r in all_rows],
    }


def cifar(reporter: LogReporter) -> dict[str, Any] | None:
    shared = ROOT.parent / "shared"
    weights = shared / "models" / "cifar10_resnet18.pth"
    if not weights.exists():
        reporter.info(f"skipping the CIFAR-10 rows: {weights} is not there")
        return None
    spec = DataSpec(
        f"imagefolder:{shared / 'data' / 'cifar10'}",
        input_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
    data = load_dataset(spec, reporter)
    model = build_model("resnet18_cifar", 10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return baselines(model.eval(), data, QuantizeSettings(), reporter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--finetune-steps", type=int, default=25)
    parser.add_argument("--cifar", action="store_true", help="also quantize the shared CIFAR-10 baseline")
    args = parser.parse_args()
    reporter = LogReporter()
    started = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        base = SearchConfig(
            budget_ms=1.0,  # set below from the measured baseline
            model="resnet18",
            data=DataSpec("digits", input_size=64),
            trials=args.trials,
            finetune_steps=args.finetune_steps,
            studies_dir=tmp,
        )
        data = load_dataset(base.data, reporter)
        baseline = prepare_baseline(
            base.model,
            None,
            data,
            cache_dir=Path(tmp) / "cache",
            epochs=base.baseline_epochs,
            seed=0,
            reporter=reporter,
        )
        side = baselines(baseline.model, data, QuantizeSettings(), reporter)
        budget = round(0.5 * side["fp32"]["latency_ms"], 2)
        reporter.info(f"budget {budget} ms (half the FP32 baseline)")
        fp32_only = search(
            SearchConfig(**{**base.__dict__, "budget_ms": budget, "precisions": ("fp32",), "study": "fp32"}), reporter
        )
        both = search(
            SearchConfig(**{**base.__dict__, "budget_ms": budget, "precisions": ("fp32", "int8"), "study": "both"}),
            reporter,
        )
    result = {
        "command": "python benchmarks/int8.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "cpu_int8_flags": sorted(f for f in cpu_flags() if "vnni" in f or f.startswith("avx512") or f == "avx2"),
        "versions": package_versions(),
        "setting": {
            "model": "resnet18",
            "data": "digits at 64x64",
            "budget_ms": budget,
            "trials": args.trials,
            "finetune_steps": args.finetune_steps,
        },
        "baselines": side,
        "search_fp32": fp32_only,
        "search_fp32_int8": both,
        "cifar10_baselines": cifar(reporter) if args.cifar else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_at_start": load,
    }
    (ROOT / "benchmarks" / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section(result)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("search")}, indent=2))


def _row(name: str, ms: float, base_ms: float, acc: float | None, note: str) -> str:
    top = "-" if acc is None else f"{acc:.2%}"
    return f"| {name} | {ms:.2f} | {ms / base_ms:.0%} | {top} | {note} |"


def write_section(result: dict[str, Any]) -> None:
    side, fp32_only, both = result["baselines"], result["search_fp32"], result["search_fp32_int8"]
    base_ms = side["fp32"]["latency_ms"]
    check = both["int8_check"] or {}
    lines = [
        f"## {SECTION}",
        "",
        f"`{result['command'].strip()}` on {result['date']}, {result['hardware'].get('cpu', 'this CPU')} "
        f"(flags: {', '.join(result['cpu_int8_flags']) or 'none'}), 1 ONNX Runtime thread, batch 1; "
        f"{result['setting']['data']}, ResNet-18 baseline trained here, budget {result['setting']['budget_ms']} ms "
        f"(half the FP32 baseline), {result['setting']['trials']} trials per search, "
        f"{result['setting']['finetune_steps']} fine-tune steps. Wall time {result['wall_seconds'] / 60:.1f} min. "
        f"Load average when it started: {result['load_average_at_start']}. Searched rows: latency is the "
        "policy's ratio to the FP32 baseline timed interleaved with it, times the FP32 latency of the first row. "
        "Raw numbers: `benchmarks/int8.json`, log: `benchmarks/int8.log`.",
        "",
        "| model | latency ms | of FP32 | top-1 (val) | notes |",
        "| --- | --- | --- | --- | --- |",
        _row("FP32 baseline", base_ms, base_ms, side["fp32"]["top1_onnxruntime"], "ONNX Runtime FP32"),
        _row(
            "INT8 baseline (just quantize)",
            side["int8"]["latency_ms"],
            base_ms,
            side["int8"]["top1_onnxruntime"],
            f"QDQ per-channel, MinMax 256 images; top-1 in ONNX Runtime; agrees with FP32 on "
            f"{side['int8']['top1_agreement_with_fp32']:.1%} of val",
        ),
    ]
    for label, run in (("search, --precision fp32", fp32_only), ("search, --precision fp32,int8", both)):
        best = run["best"]
        if best is None:
            lines.append(f"| best of {label} | - | - | - | nothing within the budget in {run['trials']} trials |")
            continue
        note = (
            f"trial {best['trial']}: {best['policy']}; {run['within_budget']}/{run['trials']} within budget, "
            f"{run['int8_trials']} INT8 trials, searched {'+'.join(run['searched_precisions'] or [])}, "
            f"{run['seconds'] / 60:.1f} min"
        )
        lines.append(_row(f"best of {label}", best["ratio"] * base_ms, base_ms, best["accuracy"], note))
    lines += [
        "",
        "Pareto front of the `fp32,int8` search (of FP32 latency, top-1): "
        + "; ".join(f"{r['latency_ratio']:.0%} {r['accuracy']:.2%} {r['precision']}" for r in both["front"])
        + ".",
        "",
        f"INT8 decision of the `fp32,int8` search: INT8 baseline at {check.get('ratio')} of FP32 timed interleaved "
        f"(INT8 is searched when <= {check.get('max_ratio')}); "
        + ("INT8 was searched." if check.get("faster") else "INT8 was **not** searched (said once, FP32 only)."),
    ]
    cifar = result.get("cifar10_baselines")
    if cifar:
        lines += [
            "",
            f"Shared CIFAR-10 ResNet-18 (32x32, {cifar['val_images']} val images, no search): FP32 "
            f"{cifar['fp32']['latency_ms']:.2f} ms, top-1 {cifar['fp32']['top1_onnxruntime']:.2%}; INT8 "
            f"{cifar['int8']['latency_ms']:.2f} ms ({cifar['int8']['ratio_to_fp32']:.0%} of FP32), top-1 "
            f"{cifar['int8']['top1_onnxruntime']:.2%}, agreement {cifar['int8']['top1_agreement_with_fp32']:.2%}.",
        ]
    text = "\n".join(lines) + "\n"
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {SECTION}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        current = pattern.sub(lambda _: text + "\n", current).rstrip() + "\n"
    else:
        current = current.rstrip() + "\n\n" + text
    path.write_text(current)


if __name__ == "__main__":
    main()

"""Benchmark: every torchvision CNN family on this CPU, unpruned and at its space's most pruned policy.

Per family, one representative (the smallest model of the family), untrained (latency and MACs
do not depend on the weights), at its native input size (224 px; Inception v3 at 299):

* unpruned FP32 latency (ONNX Runtime, 1 thread, batch 1, median) and MACs;
* the fastest policy of its default space (the most pruned every stage may go: the floor a
  search can reach), its latency timed interleaved with the unpruned model, and its MACs;
* whether INT8 pays: the unpruned model statically quantized (QDQ, as the search does,
  calibrated on random inputs since only speed is measured here), timed interleaved with FP32.

    python benchmarks/families.py [--quick]   > benchmarks/families.log

Writes ``benchmarks/families.json`` and the "Model families" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.sections import write_section  # noqa: E402
from search.measuring.complexity import macs_and_params  # noqa: E402
from search.measuring.hardware import cpu_flags, fingerprint, git_revision  # noqa: E402
from search.measuring.onnx_export import export_onnx  # noqa: E402
from search.measuring.preflight import check_searchable  # noqa: E402
from search.measuring.quantize import QuantizeSettings, quantize_onnx  # noqa: E402
from search.measuring.timing import LatencySettings, measure  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.pruning.auto_space import space_for  # noqa: E402
from search.pruning.channels import apply_policy  # noqa: E402

SECTION = "Model families"
FAMILIES = [
    ("resnet", "resnet18", 224),
    ("resnext", "resnext50_32x4d", 224),
    ("wide_resnet", "wide_resnet50_2", 224),
    ("mobilenet_v2", "mobilenet_v2", 224),
    ("mobilenet_v3", "mobilenet_v3_small", 224),
    ("efficientnet", "efficientnet_b0", 224),
    ("efficientnet_v2", "efficientnet_v2_s", 224),
    ("regnet (X)", "regnet_x_400mf", 224),
    ("regnet (Y)", "regnet_y_400mf", 224),
    ("convnext", "convnext_tiny", 224),
    ("mnasnet", "mnasnet0_5", 224),
    ("squeezenet", "squeezenet1_1", 224),
    ("densenet", "densenet121", 224),
    ("googlenet", "googlenet", 224),
    ("inception_v3", "inception_v3", 299),
    ("vgg", "vgg11", 224),
    ("alexnet", "alexnet", 224),
]
QUICK = [("resnet", "resnet18", 64), ("regnet (X)", "regnet_x_400mf", 64), ("mobilenet_v3", "mobilenet_v3_small", 64)]
TIMING = LatencySettings(threads=1, max_seconds=8.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def one_family(family: str, name: str, size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(name, 1000).eval()
    example = torch.randn(1, 3, size, size)
    space = space_for(name, None, 1000, example)
    check_searchable(name, model, space, example)
    fp32 = export_onnx(model, example)
    shape = tuple(example.shape)
    base = measure(fp32, shape, TIMING)
    fastest = None
    for policy in space.fastest_policies():  # one per rounding choice; latency is not monotone in channels
        pruned = copy.deepcopy(model)
        with torch.enable_grad():
            apply_policy(pruned, policy, space, example)
        timed = measure(export_onnx(pruned, example), shape, TIMING, reference=fp32)
        if fastest is None or timed.ratio < fastest[0].ratio:
            fastest = (timed, macs_and_params(pruned, size)[0], policy.round_to)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, size, size), dtype=np.float32) for _ in range(8)]
    int8 = quantize_onnx(fp32, calibration, QuantizeSettings())
    int8_timed = measure(int8, shape, TIMING, reference=fp32)
    macs = macs_and_params(model, size)[0]
    row = {
        "family": family,
        "model": name,
        "input": size,
        "space": Path(space.path).name if space.path.endswith(".toml") else "derived",
        "stages": len(space.stages),
        "unpruned_ms": base.median_ms,
        "unpruned_mmacs": macs / 1e6,
        "fastest_ms": fastest[0].median_ms,
        "fastest_ratio": fastest[0].ratio,
        "fastest_mmacs": fastest[1] / 1e6,
        "fastest_round_to": fastest[2],
        "int8_ms": int8_timed.median_ms,
        "int8_ratio": int8_timed.ratio,
        "seconds": time.perf_counter() - started,
    }
    log(
        f"{family:16s} {name:20s} {row['unpruned_ms']:8.2f} ms  fastest {row['fastest_ms']:7.2f} ms "
        f"({row['fastest_ratio']:.2f}x)  int8 {row['int8_ratio']:.2f}x  {row['seconds']:.0f} s"
    )
    return row


def section(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"`python benchmarks/families.py`, {meta['date']}, git {meta['git'][:10]}, {meta['cpu']} "
        f"({'VNNI' if meta['vnni'] else 'no VNNI'}), ONNX Runtime 1 thread, batch 1; {meta['minutes']:.1f} min.",
        "",
        "One model per torchvision CNN family, untrained (latency and MACs do not depend on weights), at its native "
        "input. *Fastest* is the most pruned policy of the family's default space (every stage at the top of its "
        "ranges: the floor a search can reach), timed interleaved with the unpruned model; the ratio is the one to "
        "read, since the machine is shared. *INT8* is the unpruned model quantized as the search does (QDQ, "
        "per-channel weights; calibrated on random inputs, as only speed is measured), timed interleaved with FP32: "
        "below 1.0 it pays on this CPU.",
        "",
        "| family | model | input | space (stages) | unpruned | MMACs | fastest policy | ratio | MMACs | INT8 / FP32 | INT8 pays |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | `{r['model']}` | {r['input']} | {r['space']} ({r['stages']}) | {r['unpruned_ms']:.2f} ms | "
            f"{r['unpruned_mmacs']:,.0f} | {r['fastest_ms']:.2f} ms | {r['fastest_ratio']:.2f} | {r['fastest_mmacs']:,.0f} | "
            f"{r['int8_ratio']:.2f} | {'yes' if r['int8_ratio'] < 0.95 else 'no'} |"
        )
    lines += [
        "",
        "Refused at the start with the reason: ShuffleNetV2 (torch-pruning's dependency graph cannot trace its channel "
        "shuffle) and the transformer classifiers (ViT, Swin, MaxViT). `tests/test_families.py` runs every row's family "
        "at a tiny input through pruning, ONNX export, ONNX Runtime parity, the history replay export uses, and timing.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three families at 64 px (a smoke run)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    torch.set_num_threads(2)
    rows = [one_family(*spec) for spec in (QUICK if args.quick else FAMILIES)]
    print_ = fingerprint(1)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "git": git_revision() or "unknown",
        "cpu": print_.get("cpu", "unknown CPU"),
        "vnni": any("vnni" in f for f in cpu_flags()),
        "minutes": (time.perf_counter() - started) / 60,
        "quick": args.quick,
    }
    if args.quick:
        log("quick run: nothing written")
        return
    (ROOT / "benchmarks" / "families.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_section(SECTION, section(rows, meta))
    log("wrote benchmarks/families.json and the 'Model families' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()

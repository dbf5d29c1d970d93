"""Does the INT8 accuracy a search reads in ONNX Runtime hold for the INT8 file another runtime ships?

A search in any runtime reads an INT8 trial's top-1 from ONNX Runtime's static QDQ model, while
``export --runtime openvino`` ships that same QDQ model compiled by OpenVINO and ``--runtime executorch``
ships a different quantization, ExecuTorch's PT2E ``XNNPACKQuantizer`` lowered to XNNPACK. This reads
all three INT8 models of the same networks (the committed MobileNetV2 CIFAR baseline of
``benchmarks/allocation.py``, unpruned, and uniformly pruned at 0.5 and 0.7, BatchNorm recalibrated and
fine-tuned for 100 steps as a promoted trial is) on the same validation images of the shared CIFAR-10, calibrated
on the same training images, and reports each top-1, the paired differences to ONNX Runtime's and how
often two runtimes get the same images right.

    python benchmarks/int8_runtimes.py            # about 5 minutes on 2 cores

Writes ``benchmarks/int8_runtimes.json``. Runtimes that are not installed are skipped and listed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.allocation import COMMITTED, MOBILENET, cpu_label  # noqa: E402
from benchmarks.signal_lib.bench import load_data  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.measuring.quantize import QuantizeSettings, calibration_batches, quantize_model  # noqa: E402
from search.measuring.runtimes.lowering import quantize_pte  # noqa: E402
from search.measuring.runtimes.registry import get_runtime  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.models.weights import load_weights  # noqa: E402
from search.pruning.auto_space import space_for  # noqa: E402
from search.pruning.channels import apply_policy  # noqa: E402
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train  # noqa: E402

IMAGES = 2000
"""Validation images, the search's default ``--val-images``: the same fixed subset for every model and runtime."""
RATIOS = (0.0, 0.5, 0.7)
FINETUNE_STEPS = 100


def correct(run: Any, x: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """Per image, whether ``run`` (a runtime's loaded model, batch 1) gets it right."""
    hits = []
    for i in range(len(x)):
        out = run(x[i : i + 1].numpy())
        out = out[0] if isinstance(out, (list, tuple)) else out
        hits.append(int(np.asarray(out).argmax()) == int(y[i]))
    return np.array(hits)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """b - a in top-1, its standard error from the images where they disagree, and how often both agree."""
    diff = b.astype(float) - a.astype(float)
    return {
        "difference_pp": round(100 * float(diff.mean()), 2),
        "standard_error_pp": round(100 * float(diff.std(ddof=1)) / math.sqrt(len(diff)), 2),
        "same_images_right": round(float((a == b).mean()), 4),
    }


def main() -> None:
    torch.set_num_threads(1)
    data = load_data()
    net = build_model(MOBILENET, data.num_classes)
    load_weights(net, str(COMMITTED / f"{MOBILENET}-15ep.pth"), model_name=MOBILENET)
    net.eval()
    space = space_for(MOBILENET, None, data.num_classes, data.example_input())
    assert space is not None
    quantize = QuantizeSettings()
    batches = [(x, y) for x, y in data.batches("val", 64, shuffle=True, augment=False, limit=IMAGES)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).numpy()
    installed = {name: get_runtime(name).unavailable() is None for name in ("onnxruntime", "openvino", "executorch")}
    rows = []
    for ratio in RATIOS:
        model = copy.deepcopy(net)
        if ratio:
            model = apply_policy(model, space.uniform(ratio), space, data.example_input()).model
            recalibrate_batchnorm(model, data, batches=8, batch_size=64)
            train(model, data, TrainSettings(steps=FINETUNE_STEPS, batch_size=64, lr=0.01, train_dtype="fp32"))
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            fp32 = model(x).argmax(1).numpy() == y
        qdq = quantize_model(model, data, quantize).int8_onnx
        hits = {"onnxruntime": correct(get_runtime("onnxruntime").load(qdq, 1), x, y)}
        if installed["openvino"]:
            hits["openvino"] = correct(get_runtime("openvino").load(qdq, 1), x, y)
        if installed["executorch"]:
            pte = quantize_pte(model, data.example_input(), calibration_batches(data, quantize))
            hits["executorch"] = correct(get_runtime("executorch").load(pte, 1), x, y)
        row = {
            "model": "unpruned" if not ratio else f"uniform {ratio:g}, {FINETUNE_STEPS} fine-tune steps",
            "fp32_top1": round(float(fp32.mean()), 4),
            "int8_top1": {name: round(float(h.mean()), 4) for name, h in hits.items()},
            "against_onnxruntime": {
                name: paired(hits["onnxruntime"], h) for name, h in hits.items() if name != "onnxruntime"
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    hardware = fingerprint(1)
    result = {
        "what": __doc__.split("\n\n")[0],
        "images": IMAGES,
        "cpu": cpu_label(hardware),
        "not_installed": [name for name, ok in installed.items() if not ok],
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "versions": package_versions(),
    }
    (ROOT / "benchmarks" / "int8_runtimes.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

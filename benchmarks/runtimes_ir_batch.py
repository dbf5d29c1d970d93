"""One-off check behind the batch-1 IR that ``export --runtime openvino`` ships (2026-12-05, AMD EPYC with
AVX-512/VNNI/BF16, 2 cores, 1 thread): the IR of one exported trial as ``export`` wrote it before (dynamic
batch) timed with ``bench``'s timer interleaved with the same ONNX saved at batch 1, twice per precision.

    python benchmarks/runtimes_ir_batch.py EXPORT_FOLDER   # a trial folder of an openvino export made
                                                            # before the change (model.xml with batch "?")

Writes ``benchmarks/runtimes_ir_batch.json``: dynamic ms, batch-1 ms and their ratio (1.05-1.10 on that day:
the dynamic batch was 5-10% slower, so the shipped IR missed the search's ratio by +8.6% for INT8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.cli.bench import _measure  # noqa: E402
from search.shipping.runtime_files import _save_ir  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1])
    out = {}
    for name in ("model", "model.int8"):
        static = folder / f"{name}.batch1.xml"
        _save_ir((folder / f"{name}.onnx").read_bytes(), static)
        for rep in range(2):
            _, timed = _measure(str(folder / f"{name}.xml"), str(static), 1, runtime="openvino")
            out[f"{name} rep{rep}"] = {
                "dynamic_ms": round(timed.median_ms, 4),
                "static_ms": round(timed.reference_median_ms or 0.0, 4),
                "dynamic/static": round(timed.ratio or 0.0, 4),
            }
            print(name, out[f"{name} rep{rep}"], flush=True)
    (ROOT / "benchmarks" / "runtimes_ir_batch.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

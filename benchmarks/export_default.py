"""Benchmark: export the recommended policy of the default demo study (run benchmarks/default_run.py first).

Runs ``python cli.py export --best`` on that study with the default fine-tune (5 epochs,
distillation on), timed end to end, and records accuracy before and after the full fine-tune
(test split, next to the baseline's) and the export's latency measured side by side with the
unpruned baseline, in ``benchmarks/export_default.json`` and the "Export" section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.default_run import STUDIES  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402

STUDY = "resnet18-digits-30ms"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="full fine-tune epochs (export's default: 5)")
    args = parser.parse_args()
    if not (STUDIES / f"{STUDY}.db").exists():
        sys.exit(f"no default study in {STUDIES}: run benchmarks/default_run.py first")
    out = STUDIES / STUDY / "export"
    command = [
        sys.executable,
        "cli.py",
        "export",
        "--study",
        STUDY,
        "--studies-dir",
        str(STUDIES),
        "--best",
        "--out",
        str(out),
        "--force",
        "--epochs",
        str(args.epochs),
    ]
    started = time.perf_counter()
    log = ROOT / "benchmarks" / "export_default.log"
    with log.open("w") as stream:
        code = subprocess.call(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"export failed with exit code {code}; see {log}")
    card_path = next(out.glob("trial-*/card.json"))
    card = json.loads(card_path.read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "export_seconds": round(seconds, 1), "card": card}
    (ROOT / "benchmarks" / "export_default.json").write_text(json.dumps(result, indent=2) + "\n")
    acc, lat = card["accuracy"], card["latency"]
    body = "\n".join(
        [
            f"`python cli.py export --best` on the default demo study (trial {card['trial']}, "
            f"{card['recipe'] or 'searched policy'}), {result['date']}, commit `{(card['git_revision'] or '')[:10]}`.",
            "",
            "| what | measured |",
            "| --- | --- |",
            f"| top-1 on {acc['split']}: baseline / pruned before fine-tune / after {card['finetune']['epochs']} epochs "
            f"| {acc['baseline']:.2%} / {acc['before_finetune']:.2%} / **{acc['after_finetune']:.2%}** |",
            f"| top-1 on val after the search's brief fine-tune | {acc['search_brief_finetune_val']:.2%} |",
            f"| latency, same run: baseline / export | {lat['baseline_median_ms']:.2f} ms / **{lat['median_ms']:.2f} ms** "
            f"(ratio {lat['ratio']:.3f}; p90 {lat['p90_ms']:.2f} ms; budget {card['budget_ms']} ms, drift-corrected "
            f"{lat['corrected_ms']:.2f} ms) |",
            f"| ONNX Runtime vs PyTorch | max abs diff {card['onnx_check']['max_abs_diff']:.1e}, top-1 agreement "
            f"{card['onnx_check']['top1_agreement']:.3f} on {card['onnx_check']['images']} images |",
            f"| MACs / params | {card['macs'] / 1e6:.0f} M / {card['params'] / 1e6:.2f} M |",
            f"| export time (whole command) | {seconds / 60:.1f} min, of which fine-tune {card['seconds']['finetune']:.0f} s |",
            "",
            "Card: `benchmarks/export_default.json`; console output: `benchmarks/export_default.log`.",
        ]
    )
    write_section("Export", body)
    print(body)


if __name__ == "__main__":
    main()

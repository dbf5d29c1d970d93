"""The study's unpruned model, served beside its exports (``serve --baseline``).

It is rebuilt from what the study stored (its weights file checked by SHA-256, as ``export`` does)
and exported to ONNX the same way every export is (:func:`search.measuring.onnx_export.export_onnx`,
FP32, dynamic batch), in memory: nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.errors import UsageError
from search.measuring.runtimes.onnxruntime import open_session
from search.progress import Reporter
from search.serving.models import ServedModel
from search.serving.preprocess import Preprocessing

__all__ = ["baseline_model"]


def baseline_model(
    exports: list[ServedModel],
    storage: str | None,
    threads: int,
    *,
    runtime: str = "onnxruntime",
    studies_dir: Path = Path("studies"),
    weights: str | None = None,
    reporter: Reporter,
) -> ServedModel:
    """The unpruned model of the one study the ``exports`` came from, in a session of ``threads`` threads.

    The study is read from ``storage``, or from its SQLite file in ``studies_dir``.
    """
    from search.measuring.complexity import macs_and_params
    from search.measuring.onnx_export import export_onnx
    from search.shipping.preprocessing import preprocessing_record
    from search.shipping.rebuild import load_study_baseline
    from search.study.storage import default_storage_url, open_study

    studies = sorted({m.study for m in exports if m.study})
    if len(studies) != 1:
        raise UsageError(
            f"--baseline needs exports of one study; these come from {', '.join(studies) or 'no study'}: "
            "serve each study's exports separately"
        )
    hint = (
        f"--baseline reads the study the exports name ({studies[0]}); "
        "pass --studies-dir (or --storage) where that study lives"
    )
    study = open_study(studies[0], storage or default_storage_url(studies_dir, studies[0]), hint=hint)
    reporter.phase(f"baseline of study {studies[0]}: load and export to ONNX")
    base = load_study_baseline(study, weights=weights, reporter=reporter)
    sha = exports[0].card.get("baseline", {}).get("sha256")
    if sha and base.sha256 and sha != base.sha256:
        raise UsageError(f"the study's baseline (sha256 {base.sha256[:12]}) is not the one the exports were made from")
    record = preprocessing_record(base.data)
    for model in exports:
        if model.card.get("preprocessing") != record:
            raise UsageError(
                f"{model.name} was exported for other data than the study's baseline now loads "
                f"({model.preprocessing.classes[:3]}..., {model.preprocessing.input_size}px); export it again"
            )
    onnx = export_onnx(base.model, base.data.example_input(), dynamic_batch=True)
    macs, params = macs_and_params(base.model, base.data.input_size)
    first = exports[0].card
    summary: dict[str, Any] = {
        "study": studies[0],
        "trial": None,
        "recipe": "unpruned baseline",
        "precision": "fp32",
        "latency_ms": study.user_attrs.get("baseline_latency_ms"),
        "export_latency_ms": first.get("latency", {}).get("baseline_median_ms"),
        "latency_threads": first.get("latency", {}).get("threads"),
        "top1": first.get("accuracy", {}).get("baseline"),
        "top1_split": first.get("accuracy", {}).get("split"),
        "baseline_top1": first.get("accuracy", {}).get("baseline"),
        "macs": macs,
        "params": params,
        "size_bytes": len(onnx),
    }
    card = {
        "study": studies[0],
        "baseline": {"model": base.model_name, "weights": base.weights, "sha256": base.sha256},
        "preprocessing": record,
        "macs": macs,
        "params": params,
        "precision": "fp32",
    }
    return ServedModel(
        name="baseline",
        role="baseline",
        precision="fp32",
        file=f"{base.model_name} (unpruned, exported to {'ONNX' if runtime != 'executorch' else '.pte'} at start)",
        preprocessing=Preprocessing.from_card(card),
        summary=summary,
        card=card,
        run=_runner(base, onnx, threads, runtime),
        study=studies[0],
        runtime=runtime,
    )


def _runner(base: Any, onnx: bytes, threads: int, runtime: str) -> Any:
    """The unpruned model in ``runtime``: its ONNX (ONNX Runtime, OpenVINO) or lowered to ``.pte`` (ExecuTorch)."""
    if runtime == "onnxruntime":
        session = open_session(onnx, threads)
        return lambda x: session.run(None, {"input": x})[0]
    from search.serving.runtime_models import runtime_runner

    if runtime == "executorch":
        from search.measuring.runtimes.lowering import lower_pte

        return runtime_runner(runtime, lower_pte(base.model, base.data.example_input()), threads, "the baseline")
    return runtime_runner(runtime, onnx, threads, "the baseline")

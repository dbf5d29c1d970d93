"""The model card (``card.json`` and ``card.md``) and its copy on the study for optuna-dashboard."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import optuna

from search.pruning.policy import Policy
from search.shipping.recovery_card import recovery_rows

__all__ = ["DASHBOARD_TRIAL_ARTIFACTS", "attach_artifacts", "card_markdown"]


DASHBOARD_TRIAL_ARTIFACTS = "dashboard:artifacts:{trial_id}:{artifact_id}"
"""Study system attribute where optuna-dashboard looks for a trial's artifacts (besides the trial's own attributes)."""


def attach_artifacts(study: optuna.Study, number: int, out_dir: Path, store_dir: Path) -> None:
    """Attach an export's model card to its trial and to the study as artifacts, so optuna-dashboard shows them on
    the trial's page (``card.md``, ``card.json``) and on the study's (``trial-N-card.md``, ...).

    Optuna writes a trial's artifacts into the trial's own attributes, which a finished trial no
    longer takes; optuna-dashboard also lists, on a trial's page, the artifacts recorded on the
    study under the trial's id (:data:`DASHBOARD_TRIAL_ARTIFACTS`, what its own upload button
    wrote), so the trial's copy is recorded there. Each record has its own stored copy (a card is a
    few KB), so deleting one of them in the dashboard leaves the other whole.
    """
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    trial_id = study.get_trials(deepcopy=False)[number]._trial_id
    for name, mimetype in (("card.md", "text/markdown"), ("card.json", "application/json")):
        artifact_id = str(uuid.uuid4())
        with open(out_dir / name, "rb") as f:
            store.write(artifact_id, f)
        meta = {"artifact_id": artifact_id, "filename": name, "mimetype": mimetype, "encoding": None}
        key = DASHBOARD_TRIAL_ARTIFACTS.format(trial_id=trial_id, artifact_id=artifact_id)
        study._storage.set_study_system_attr(study._study_id, key, json.dumps(meta))
        named = out_dir / f"trial-{number}-{name}"
        shutil.copyfile(out_dir / name, named)
        try:
            upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study, mimetype=mimetype)
        finally:
            named.unlink(missing_ok=True)


def _int8_rows(card: dict[str, Any]) -> list[str]:
    q = card.get("int8")
    if not q:
        return []
    return [
        f"| INT8 (ONNX Runtime, QDQ) | top-1 {q['top1']:.4f}, agreement with FP32 {q['top1_agreement_with_fp32']:.3f} "
        f"on {q['images']} images; FP32 top-1 {q['fp32_top1_onnxruntime']:.4f} |",
        f"| FP32 export latency, same run | {q['fp32_latency_ms']:.2f} ms (ratio {q['fp32_ratio']:.3f}); "
        f"the INT8 model above is what ships (`model.int8.onnx`) |",
        _quantization_row(q),
    ]


def _quantization_row(q: dict[str, Any]) -> str:
    """Which INT8 model shipped: post-training quantized (PTQ), or trained with fake quantization (QAT)."""
    qat = q.get("qat")
    if not qat:
        return "| quantization | PTQ: the fine-tuned FP32 model quantized after training (`--quantization ptq`) |"
    return (
        f"| quantization | QAT: the last {qat['steps']} steps ({qat['epochs']:g} epochs) trained with fake "
        f"quantization, {qat['weights']} weights, lr {qat['lr']:g}, {qat['batchnorm']}; INT8 agrees with the "
        f"fake-quantized PyTorch model on {qat['agreement_with_fake_quant']:.3f} of {qat['images']} images "
        f"(needs {qat['min_agreement']:g}); FP32 top-1 before QAT {qat['fp32_top1_before_qat']:.4f} |"
    )


def _relative(check: dict[str, Any]) -> str:
    return f" ({check['max_rel_diff']:.1e} of the logits' scale)" if "max_rel_diff" in check else ""


def _finetune_row(ft: dict[str, Any]) -> str:
    if ft.get("skipped"):
        return f"| fine-tune | none: {ft['skipped']}, so it keeps the baseline's weights (`--finetune-unpruned`) |"
    parts = [
        f"{ft['epochs']:g} epoch{'' if ft['epochs'] == 1 else 's'} ({ft['steps']} steps)",
        f"seed {ft['seed']}",
        f"distill {ft['distill']}",
        f"{ft['seconds']} s",
    ]
    scores = ft.get("val_top1_by_epoch")
    if ft.get("kept_epoch") is not None and scores:
        last, kept = max(scores, key=int), str(ft["kept_epoch"])
        if kept == last:
            parts.append("kept the last epoch, chosen on val")
        else:
            parts.append(
                f"kept epoch {kept} (val top-1 {scores[kept]:.4f}; the last {scores[last]:.4f}), chosen on val"
            )
    return f"| fine-tune | {', '.join(parts)} |"


def card_markdown(card: dict[str, Any]) -> str:
    acc, lat, ft = card["accuracy"], card["latency"], card["finetune"]
    files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in card["files"].items())
    on = f"{acc['split']} ({acc['images']} images)" if "images" in acc else acc["split"]
    what = "unpruned" if Policy.from_dict(card["policy"]).is_unpruned else "pruned"
    if card.get("precision") == "int8":
        what += ", INT8"
    shipped = "model.int8.onnx" if card.get("precision") == "int8" else "model.onnx"
    runtime = lat.get("runtime_name", "onnxruntime")
    rt = card.get("runtime_files") or {}
    if rt:
        shipped = rt["int8"]["file"] if card.get("precision") == "int8" and rt.get("int8") else rt["file"]
    finetuned = _finetune_row(ft)
    lines = [
        f"# {card['baseline']['model']} {what}: study {card['study']}, trial {card['trial']}",
        "",
        f"Exported {card['created']} by `{card['command']}`.",
        "",
        "| | value |",
        "| --- | --- |",
        f"| top-1 on {on} after fine-tune | {acc['after_finetune']:.4f} |",
        f"| top-1 on {on} before fine-tune | {acc['before_finetune']:.4f} |",
        f"| baseline top-1 on {on} | {acc['baseline']:.4f} |",
        f"| latency median / p90 | {lat['median_ms']:.2f} / {lat['p90_ms']:.2f} ms "
        f"(batch 1, {lat['threads']} thread(s), {runtime}) |",
        f"| baseline latency, same run | {lat['baseline_median_ms']:.2f} ms (ratio {lat['ratio']:.3f}) |",
        f"| budget | {card['budget_ms']} ms (drift-corrected: {lat['corrected_ms']:.2f} ms) |",
        f"| MACs / params | {card['macs'] / 1e6:.1f} M / {card['params'] / 1e6:.2f} M |",
        f"| files | {files}; `{shipped}` is what ships |",
        f"| ONNX check | max abs diff {card['onnx_check']['max_abs_diff']:.2e}"
        f"{_relative(card['onnx_check'])}, top-1 agreement "
        f"{card['onnx_check']['top1_agreement']:.3f} on {card['onnx_check']['images']} images |",
        *_runtime_rows(rt),
        finetuned,
        *recovery_rows(card),
        *_int8_rows(card),
        f"| data | {card['data']['source']} at {card['data']['input_size']}px{_transforms(card)} |",
        f"| hardware | {card['hardware']['cpu']}, {runtime} {card['hardware'].get(runtime, '?')} |",
        "",
        "## Policy",
        "",
        "```json",
        json.dumps(card["policy"], indent=2),
        "```",
        "",
        f"Load it: `{_LOAD.get(runtime, _LOAD['onnxruntime']).format(shipped)}`, or the FP32 model in PyTorch: "
        "`torch.jit.load('model.torchscript.pt')` or `search.shipping.model_file.load_pruned('model.pt')`.",
        "",
    ]
    return "\n".join(lines)


def _transforms(card: dict[str, Any]) -> str:
    """How the fine-tune augmented and evaluation cropped (cards before issue #15 do not say)."""
    seen = card.get("augmentation")
    device = (card.get("train_device") or {}).get("name")
    if not seen:
        return ""
    where = f" on {device}" if device else ""
    return f"; fine-tuned{where} on {seen['train']}; evaluated on the {seen['evaluation']}"


_LOAD = {
    "onnxruntime": "onnxruntime.InferenceSession('{}')",
    "openvino": "openvino.Core().compile_model('{}', 'CPU')",
    "executorch": "executorch.runtime.Runtime.get().load_program('{}').load_method('forward')",
}


def _runtime_rows(record: dict[str, Any]) -> list[str]:
    """The checks of the runtime's own files (an OpenVINO or ExecuTorch export)."""
    if not record:
        return []
    parity = record["parity"]
    rows = [
        f"| {record['runtime']} check | `{record['file']}`: max abs diff {parity['max_abs_diff']:.2e}, top-1 "
        f"agreement {parity['top1_agreement']:.3f} on {parity['images']} images |"
    ]
    if record.get("int8"):
        q = record["int8"]
        rows.append(
            f"| {record['runtime']} INT8 | `{q['file']}`: top-1 {q['top1']:.4f} (FP32 file {q['fp32_top1']:.4f}), "
            f"agreement with FP32 {q['top1_agreement_with_fp32']:.3f} on {q['images']} images |"
        )
    return rows

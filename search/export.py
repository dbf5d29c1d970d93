"""Turn a searched policy into a shipped model: rebuild, fully fine-tune, check, export, describe.

For each chosen trial: rebuild the pruned model from the stored baseline and the trial's
pruning history (refusing if the baseline file changed or the architecture differs from the
one the trial measured), fine-tune it for whole epochs (resumable), measure top-1 on the test
split next to the baseline's, export ONNX with a dynamic batch axis, check ONNX Runtime
against PyTorch, re-measure latency the way the search did, and write a model card.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import torch_pruning as tp
from optuna.trial import TrialState
from torch import nn

from search.channel_pruning import architecture_hash, layer_channels
from search.complexity import macs_and_params
from search.data import Dataset, DataSpec, load_dataset
from search.errors import UsageError
from search.evaluate import top1
from search.export_settings import ExportSettings
from search.finetune import TrainSettings, recalibrate_batchnorm, train
from search.hardware import fingerprint, git_revision, package_versions
from search.latency import LatencySettings, export_onnx, measure, open_session
from search.models import build_model, file_sha256, load_weights
from search.progress import NullReporter, Reporter
from search.quantize import QuantizeSettings, calibration_batches, compare_top1, fix_batch, quantize_onnx
from search.report import recommended, rows

__all__ = [
    "PRUNED_FORMAT",
    "ExportSettings",
    "StudyBaseline",
    "attach_artifacts",
    "card_markdown",
    "check_parity",
    "export_trial",
    "finished_trial",
    "load_pruned",
    "load_study_baseline",
    "pick_best",
    "rebuild_pruned",
]

PRUNED_FORMAT = "prune-search/pruned-model"


@dataclass
class StudyBaseline:
    """What the study was run on, rebuilt from what it stored."""

    study: optuna.Study
    data: Dataset
    model: nn.Module
    model_name: str
    weights: str
    sha256: str | None
    threads: int


def load_study_baseline(
    study: optuna.Study, *, weights: str | None = None, reporter: Reporter | None = None
) -> StudyBaseline:
    """Load the study's data and baseline, refusing a baseline file that changed since the search."""
    attrs = study.user_attrs
    if "config" not in attrs or "baseline" not in attrs:
        raise UsageError(f"study {study.study_name!r} was not made by this tool's search")
    config = attrs["config"]
    spec = dict(config["data"])
    for key in ("mean", "std"):
        if spec.get(key) is not None:
            spec[key] = tuple(spec[key])
    data = load_dataset(DataSpec(**spec), reporter)
    stored = attrs["baseline"]
    path = weights or stored["weights"]
    if path != "imagenet" and not Path(path).is_file():
        raise UsageError(
            f"the study's baseline {path} is missing; pass --weights PATH to a copy of it (checked by hash)"
        )
    if path != "imagenet" and stored.get("sha256") and file_sha256(path) != stored["sha256"]:
        raise UsageError(
            f"baseline {path} changed since the search (sha256 {file_sha256(path)[:12]}, the study used "
            f"{stored['sha256'][:12]}); export from the file the study searched on"
        )
    model = build_model(stored["model"], data.num_classes)
    loaded = load_weights(model, path, model_name=stored["model"])
    model.eval()
    return StudyBaseline(study, data, model, stored["model"], path, loaded.sha256, int(config.get("threads", 1)))


def finished_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` if it completed, with a one-line error otherwise."""
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise UsageError(f"study {study.study_name!r} has no trial {number} (it has trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("error", "no error recorded")
        raise UsageError(f"trial {number} failed ({reason}); pick a completed trial")
    if trial.state != TrialState.COMPLETE:
        raise UsageError(f"trial {number} is {trial.state.name.lower()}, not finished; pick a completed trial")
    if "pruning_history" not in trial.user_attrs:
        raise UsageError(f"trial {number} has no stored pruning history (made by an older version); rerun it")
    return trial


def pick_best(study: optuna.Study) -> int:
    """The recommended trial: the most accurate one within the budget."""
    all_rows = rows(study)
    best = recommended(all_rows)
    if best is None:
        budget = float(study.user_attrs["budget_ms"])
        nearest = sorted(all_rows, key=lambda r: r.latency_ms)[:3]
        listed = ", ".join(f"trial {r.number} at {r.latency_ms:.2f} ms" for r in nearest) or "none"
        raise UsageError(
            f"no trial of study {study.study_name!r} is within its {budget:g} ms budget (fastest: {listed}); "
            f"run more trials or export one with --trial N"
        )
    return best.number


def rebuild_pruned(base: StudyBaseline, trial: optuna.trial.FrozenTrial) -> nn.Module:
    """The trial's pruned model with the baseline's weights, checked against what it measured."""
    import copy

    model = copy.deepcopy(base.model)
    _replay(model, trial.user_attrs["pruning_history"], base.data.example_input())
    arch = architecture_hash(model, tuple(base.data.example_input().shape[1:]))
    if arch != trial.user_attrs.get("arch_hash"):
        raise UsageError(
            f"the rebuilt model of trial {trial.number} does not have the architecture the trial measured "
            f"({arch} vs {trial.user_attrs.get('arch_hash')}); the baseline or torch-pruning version differs"
        )
    return model


def _replay(model: nn.Module, history: list[Any], example: torch.Tensor) -> None:
    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example)
    graph.load_pruning_history([(name, bool(out), list(idxs)) for name, out, idxs in history])


def export_trial(
    base: StudyBaseline,
    number: int,
    settings: ExportSettings,
    out_dir: Path,
    *,
    command: str,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Export trial ``number`` into ``out_dir``; returns the model card."""
    reporter = reporter or NullReporter()
    trial = finished_trial(base.study, number)
    card_path = out_dir / "card.json"
    if out_dir.exists() and any(out_dir.iterdir()):
        if force:
            shutil.rmtree(out_dir)
        elif card_path.exists():
            raise UsageError(f"{out_dir} already holds an export; pass --force to replace it or --out elsewhere")
        elif not (out_dir / "finetune-state.pt").exists():
            raise UsageError(f"{out_dir} exists and is not an unfinished export; pass --force or --out elsewhere")
        else:
            reporter.info(f"Resuming the unfinished export in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    data = base.data
    row = next(r for r in rows(base.study) if r.number == number)
    if not row.feasible:
        reporter.warn(f"trial {number} is over the study's budget ({row.latency_ms:.2f} ms)")

    reporter.phase(f"trial {number}: rebuild")
    model = rebuild_pruned(base, trial)
    split = "test" if data.test is not None else "val"
    reporter.phase(f"trial {number}: baseline top-1 on {split}")
    baseline_top1 = _baseline_top1(base, split, settings.test_images, reporter)

    reporter.phase(f"trial {number}: fine-tune")
    t = time.perf_counter()
    state = out_dir / "finetune-state.pt"
    if not state.exists():
        recalibrate_batchnorm(model, data, batches=8, seed=settings.seed)
    before = top1(model, data, split, limit=settings.test_images, reporter=reporter)
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    train_settings = TrainSettings(
        steps=settings.steps if settings.steps is not None else max(1, round(settings.epochs * steps_per_epoch)),
        batch_size=settings.batch_size,
        lr=settings.lr,
        distill=settings.distill,
        train_dtype=settings.train_dtype,
        seed=settings.seed,
    )
    result = train(
        model,
        data,
        train_settings,
        teacher=base.model,
        reporter=reporter,
        description=f"fine-tune trial {number} ({settings.epochs:g} epochs, seed {settings.seed})",
        steps_per_epoch=steps_per_epoch,
        checkpoint=state,
    )
    seconds["finetune"] = time.perf_counter() - t
    after = top1(model, data, split, limit=settings.test_images, reporter=reporter)

    reporter.phase(f"trial {number}: export and check ONNX")
    t = time.perf_counter()
    model.eval()
    onnx_model = export_onnx(model, data.example_input(), dynamic_batch=True)
    (out_dir / "model.onnx").write_bytes(onnx_model)
    parity = check_parity(model, onnx_model, data, split, settings, base.threads)
    seconds["export"] = time.perf_counter() - t

    int8 = None
    shipped = onnx_model
    if trial.user_attrs.get("precision") == "int8":
        reporter.phase(f"trial {number}: quantize to INT8 and check it")
        t = time.perf_counter()
        int8 = _quantize_and_check(model, onnx_model, data, split, settings, trial, base.threads, reporter)
        (out_dir / "model.int8.onnx").write_bytes(int8.pop("onnx"))
        shipped = fix_batch((out_dir / "model.int8.onnx").read_bytes())
        seconds["quantize"] = time.perf_counter() - t

    reporter.phase(f"trial {number}: latency")
    t = time.perf_counter()
    baseline_onnx = export_onnx(base.model, data.example_input())
    shape = tuple(data.example_input().shape)
    timing = LatencySettings(threads=base.threads)
    measured = measure(shipped, shape, timing, reference=baseline_onnx)
    if int8 is not None:  # the FP32 export too, so the card can show what INT8 gained
        fp32_measured = measure(fix_batch(onnx_model), shape, timing, reference=baseline_onnx)
        int8["fp32_latency_ms"] = round(fp32_measured.median_ms, 4)
        int8["fp32_ratio"] = round(fp32_measured.ratio or 0.0, 5)
        int8["fp32_after_finetune"] = after
    seconds["latency"] = time.perf_counter() - t
    study_base_ms = float(base.study.user_attrs["baseline_latency_ms"])

    _save_pruned(out_dir / "model.pt", model, base, trial)
    _save_torchscript(out_dir / "model.torchscript.pt", model, data)
    state.unlink(missing_ok=True)
    macs, params = macs_and_params(model, data.input_size)
    seconds["total"] = time.perf_counter() - started
    card = {
        "study": base.study.study_name,
        "trial": number,
        "recipe": row.recipe,
        "policy": trial.user_attrs["policy"],
        "channels": layer_channels(model),
        "accuracy": {
            "split": split,
            "images": min(len(data.split(split)), settings.test_images or len(data.split(split))),
            "search_brief_finetune_val": row.accuracy,
            "before_finetune": before,
            "after_finetune": after,
            "baseline": baseline_top1,
        },
        "finetune": {
            **asdict(settings),
            "steps": train_settings.steps,
            "seconds": round(result.seconds, 1),
            "images_per_second": round(result.images_per_second, 1),
        },
        "latency": {
            "median_ms": round(measured.median_ms, 4),
            "p90_ms": round(measured.p90_ms, 4),
            "baseline_median_ms": round(measured.reference_median_ms or 0.0, 4),
            "ratio": round(measured.ratio or 0.0, 5),
            "corrected_ms": round((measured.ratio or 0.0) * study_base_ms, 4),
            "search_ms": row.latency_ms,
            "threads": base.threads,
            "batch": 1,
            "runtime": "onnxruntime CPUExecutionProvider",
        },
        "onnx_check": parity,
        "precision": "int8" if int8 is not None else "fp32",
        "int8": int8,
        "macs": macs,
        "params": params,
        "files": {
            name: (out_dir / name).stat().st_size
            for name in ("model.onnx", "model.int8.onnx", "model.pt", "model.torchscript.pt")
            if (out_dir / name).exists()
        },
        "data": {
            "source": base.study.user_attrs["config"]["data"]["source"],
            "input_size": data.input_size,
            "mean": list(data.mean),
            "std": list(data.std),
            "classes": data.classes,
        },
        "baseline": {"model": base.model_name, "weights": base.weights, "sha256": base.sha256},
        "budget_ms": base.study.user_attrs["budget_ms"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "command": command,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "hardware": fingerprint(base.threads),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "card.md").write_text(card_markdown(card))
    return card


def _baseline_top1(base: StudyBaseline, split: str, limit: int | None, reporter: Reporter) -> float:
    """The baseline's top-1 on ``split`` (or its random subset of ``limit`` images), measured once per study."""
    key = f"baseline_top1_{split}" + (f"_{limit}" if limit else "")
    stored = base.study.user_attrs.get(key)
    if stored is not None and stored.get("sha256") == base.sha256:
        return float(stored["top1"])
    value = top1(base.model, base.data, split, limit=limit, reporter=reporter)
    base.study.set_user_attr(key, {"top1": value, "sha256": base.sha256})
    return value


def _quantize_and_check(
    model: nn.Module,
    fp32_onnx: bytes,
    data: Dataset,
    split: str,
    settings: ExportSettings,
    trial: optuna.trial.FrozenTrial,
    threads: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """The INT8 model as the search made it (same calibration settings), checked against FP32."""
    recorded = trial.user_attrs.get("quantization", {})
    quantize = QuantizeSettings.from_dict(recorded)
    int8_onnx = quantize_onnx(fp32_onnx, calibration_batches(data, quantize), quantize)
    agreement = compare_top1(
        fp32_onnx, int8_onnx, data, split, threads=threads, limit=settings.test_images, reporter=reporter
    )
    result: dict[str, Any] = {
        "onnx": int8_onnx,
        "quantization": quantize.to_dict(),
        "top1": agreement.top1_b,
        "fp32_top1_onnxruntime": agreement.top1_a,
        "top1_agreement_with_fp32": agreement.agreement,
        "images": agreement.images,
        "min_agreement": settings.min_int8_agreement,
    }
    if agreement.agreement < settings.min_int8_agreement:
        raise RuntimeError(
            f"the INT8 model agrees with the FP32 model on only {agreement.agreement:.1%} of {split} images "
            f"(needs {settings.min_int8_agreement:.0%}); try --calibration-method entropy in the search"
        )
    return result


def check_parity(
    model: nn.Module, onnx_model: bytes, data: Dataset, split: str, settings: ExportSettings, threads: int
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on real images; raises if they disagree past the tolerances."""
    session = open_session(onnx_model, threads)
    worst = 0.0
    agree = total = 0
    for x, _ in data.batches(split, 32, shuffle=False, augment=False, limit=settings.parity_images):
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(x)
    result = {
        "images": total,
        "max_abs_diff": worst,
        "top1_agreement": agree / max(total, 1),
        "tolerance": settings.max_abs_diff,
        "min_agreement": settings.min_agreement,
    }
    if worst > settings.max_abs_diff or result["top1_agreement"] < settings.min_agreement:
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: {result}")
    return result


def _save_pruned(path: Path, model: nn.Module, base: StudyBaseline, trial: optuna.trial.FrozenTrial) -> None:
    torch.save(
        {
            "format": PRUNED_FORMAT,
            "version": 1,
            "model_name": base.model_name,
            "num_classes": base.data.num_classes,
            "input_size": base.data.input_size,
            "pruning_history": trial.user_attrs["pruning_history"],
            "state_dict": model.state_dict(),
        },
        path,
    )


def _save_torchscript(path: Path, model: nn.Module, data: Dataset) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream but still loads everywhere
        traced = torch.jit.trace(model.eval(), data.example_input())
    traced.save(str(path))


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild an exported pruned model (``model.pt``): the unpruned class, pruned as recorded, then the weights."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != PRUNED_FORMAT:
        raise UsageError(f"{path} is not a pruned model written by export")
    model = build_model(saved["model_name"], saved["num_classes"])
    size = int(saved["input_size"])
    _replay(model, saved["pruning_history"], torch.zeros(1, 3, size, size))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def attach_artifacts(study: optuna.Study, number: int, out_dir: Path, store_dir: Path) -> None:
    """Attach an export's model card to the study as Optuna artifacts, so optuna-dashboard shows them.

    (A finished trial cannot take artifacts in Optuna, so they go on the study, named by trial.)
    """
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    for name, mimetype in (("card.md", "text/markdown"), ("card.json", "application/json")):
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
    ]


def card_markdown(card: dict[str, Any]) -> str:
    acc, lat, ft = card["accuracy"], card["latency"], card["finetune"]
    mb = {k: v / 1e6 for k, v in card["files"].items()}
    on = f"{acc['split']} ({acc['images']} images)" if "images" in acc else acc["split"]
    lines = [
        f"# {card['baseline']['model']} pruned: study {card['study']}, trial {card['trial']}",
        "",
        f"Exported {card['created']} by `{card['command']}`.",
        "",
        "| | value |",
        "| --- | --- |",
        f"| top-1 on {on} after fine-tune | {acc['after_finetune']:.4f} |",
        f"| top-1 on {on} before fine-tune | {acc['before_finetune']:.4f} |",
        f"| baseline top-1 on {on} | {acc['baseline']:.4f} |",
        f"| latency median / p90 | {lat['median_ms']:.2f} / {lat['p90_ms']:.2f} ms "
        f"(batch 1, {lat['threads']} thread(s)) |",
        f"| baseline latency, same run | {lat['baseline_median_ms']:.2f} ms (ratio {lat['ratio']:.3f}) |",
        f"| budget | {card['budget_ms']} ms (drift-corrected: {lat['corrected_ms']:.2f} ms) |",
        f"| MACs / params | {card['macs'] / 1e6:.1f} M / {card['params'] / 1e6:.2f} M |",
        f"| files | model.onnx {mb['model.onnx']:.1f} MB, model.pt {mb['model.pt']:.1f} MB, "
        f"model.torchscript.pt {mb['model.torchscript.pt']:.1f} MB |",
        f"| ONNX check | max abs diff {card['onnx_check']['max_abs_diff']:.2e}, top-1 agreement "
        f"{card['onnx_check']['top1_agreement']:.3f} on {card['onnx_check']['images']} images |",
        f"| fine-tune | {ft['epochs']:g} epochs ({ft['steps']} steps), seed {ft['seed']}, distill {ft['distill']}, "
        f"{ft['seconds']} s |",
        *_int8_rows(card),
        f"| data | {card['data']['source']} at {card['data']['input_size']}px |",
        f"| hardware | {card['hardware']['cpu']}, onnxruntime {card['hardware']['onnxruntime']} |",
        "",
        "## Policy",
        "",
        "```json",
        json.dumps(card["policy"], indent=2),
        "```",
        "",
        "Load it: `onnxruntime.InferenceSession('model.onnx')`, `torch.jit.load('model.torchscript.pt')`, "
        "or `search.export.load_pruned('model.pt')`.",
        "",
    ]
    return "\n".join(lines)

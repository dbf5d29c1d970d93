"""Recovery at export: iterative pruning (``--prune-steps K``) and feature distillation (``--feature-distill W``).

With K > 1, export does not take the trial's pruned model as it is: it starts again from the
baseline and reaches the trial's channel counts in K steps (:mod:`search.pruning.stepwise`),
each removing part of the channels by the policy's criterion on the current weights, followed by
its share of the fine-tune (the optimizer steps of ``--epochs`` split evenly; each share has
its own warm-up and cosine decay). Steps 1..K-1 run here; the last step's fine-tune is export's
usual one (best epoch on val, resumable). The last step lands on exactly the trial's channels,
which export then checks against the architecture the trial timed.

Interrupted exports resume: each step's torch-pruning history is written to ``prune-steps.json``
in the export's working folder as soon as it is pruned, the fine-tune of a step is checkpointed
at epoch ends, and a finished step's weights are kept until the next step finishes. A resumed
export replays the recorded steps and carries on where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.errors import UsageError
from search.progress import Reporter
from search.pruning.channels import TAYLOR_IMAGES, architecture_hash, layer_channels
from search.pruning.groups import replay
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace, parse_space
from search.pruning.stepwise import check_prune_steps, prune_towards, step_targets
from search.shipping.rebuild import StudyBaseline
from search.shipping.settings import ExportSettings
from search.training.feature_distill import FeatureDistiller, stage_outputs
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train

__all__ = ["SCHEDULE_FILE", "Recovery", "split_steps", "study_space"]

SCHEDULE_FILE = "prune-steps.json"
"""The recorded pruning steps in an unfinished export's working folder (its presence means: resume)."""


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` optimizer steps split into ``parts`` shares as even as whole steps allow."""
    return [total * k // parts - total * (k - 1) // parts for k in range(1, parts + 1)]


def study_space(study: optuna.Study) -> SearchSpace:
    """The space the study searched, from the text it stored."""
    stored = study.user_attrs.get("space")
    if not _has_space(study):
        raise UsageError(
            f"study {study.study_name!r} does not store its search space (made before that was kept); "
            "use --prune-steps 1 and --feature-distill 0"
        )
    return parse_space(stored["text"], str(stored.get("path", "the study's space")))


def _has_space(study: optuna.Study) -> bool:
    stored = study.user_attrs.get("space")
    return isinstance(stored, dict) and bool(stored.get("text"))


def feature_weight(settings: ExportSettings, study: optuna.Study, reporter: Reporter) -> float:
    """The feature distillation weight to train with: the default is left out (with a line saying so) for a
    study that did not store its space; a weight the user asked for stays (and :func:`study_space` refuses)."""
    if settings.feature_distill > 0 and not settings.feature_distill_asked and not _has_space(study):
        reporter.info(
            "Feature distillation left out: the study did not store its search space (made before that was kept)"
        )
        return 0.0
    return settings.feature_distill


class Recovery:
    """What export does beyond one-shot pruning and logit distillation, for one trial."""

    def __init__(
        self,
        base: StudyBaseline,
        trial: optuna.trial.FrozenTrial,
        final: nn.Module,
        settings: ExportSettings,
        work: Path,
        reporter: Reporter,
        total_steps: int,
        steps_per_epoch: int,
    ) -> None:
        self.base, self.trial, self.settings, self.work, self.reporter = base, trial, settings, work, reporter
        self.steps = settings.prune_steps
        self.steps_per_epoch = steps_per_epoch
        self.shares = split_steps(total_steps, self.steps)
        self.policy = Policy.from_dict(trial.user_attrs["policy"])
        self.original = layer_channels(base.model)
        self.final = layer_channels(final)
        self.space: SearchSpace | None = None
        self.feature_distill = feature_weight(settings, base.study, reporter)
        if self.steps > 1 or self.feature_distill > 0:
            self.space = study_space(base.study)
        check_prune_steps(self.steps, self.original, self.final)
        self._file = work / SCHEDULE_FILE
        self._record: dict[str, Any] = {"prune_steps": self.steps, "optimizer_steps": self.shares, "steps": []}
        self._record["settings"] = {  # what else decides the weights: a resume must not mix them
            "study": base.study.study_name,  # another study's (or trial's) unfinished export in the same folder
            "trial": trial.number,
            "arch_hash": trial.user_attrs.get("arch_hash"),
            "baseline_sha256": base.sha256,
            "test_images": settings.test_images,  # the images every epoch's score (the kept epoch) is read on
            "seed": settings.seed,
            "feature_distill": settings.feature_distill,
            "quantization": settings.quantization,
            "qat_epochs": settings.qat_epochs if settings.quantization == "qat" else None,
            "lr": settings.lr,
            "distill": settings.distill,
            "batch_size": settings.batch_size,
            "train_dtype": settings.train_dtype,
        }
        self._distilled: dict[str, Any] | None = None

    @property
    def final_steps(self) -> int:
        """Optimizer steps of the last step's fine-tune (export's usual one)."""
        return self.shares[-1]

    def prune(self, model: nn.Module) -> nn.Module:
        """The model the last fine-tune starts from: ``model`` (one shot), or the baseline taken through K steps."""
        self._load()  # whatever K: an unfinished export started with other settings is refused, not mixed
        if self.steps == 1:
            self._save()
            return model
        model = copy.deepcopy(self.base.model)
        example = self.base.data.example_input()
        targets = step_targets(self.original, self.final, self.steps)
        done = [s["step"] for s in self._record["steps"] if s.get("finished")]
        last_finished = max(done, default=0)
        for k in range(1, self.steps + 1):
            entry = self._entry(k)
            if entry is None:
                self.reporter.phase(f"trial {self.trial.number}: prune step {k}/{self.steps}")
                taylor = self.base.data.batches(
                    "train", 32, shuffle=True, augment=False, seed=self.settings.seed + k, limit=TAYLOR_IMAGES
                )
                history = prune_towards(model, targets[k - 1], self.policy, self.space, example, taylor_batches=taylor)
                entry = {"step": k, "history": history, "channels": layer_channels(model)}
                self._record["steps"].append(entry)
                self._save()
            else:
                replay(model, entry["history"], example)
            if entry.get("finished"):
                if k == last_finished:
                    model.load_state_dict(torch.load(self._weights(k), map_location="cpu", weights_only=True))
                continue
            if k < self.steps:
                self._finetune_step(model, k, entry)
        arch = architecture_hash(model, tuple(example.shape[1:]))
        if arch != self.trial.user_attrs.get("arch_hash"):
            raise RuntimeError(
                f"{self.steps} pruning steps did not reach the architecture trial {self.trial.number} timed "
                f"({arch} vs {self.trial.user_attrs.get('arch_hash')})"
            )
        return model

    def distiller(self, model: nn.Module) -> FeatureDistiller | None:
        """Feature distillation of ``model`` from the baseline, or None when its weight is 0."""
        if self.feature_distill <= 0:
            return None
        assert self.space is not None
        example = self.base.data.example_input()
        where = stage_outputs(self.base.model, [(s.name, s.modules) for s in self.space.stages], example)
        if not where and not self.settings.feature_distill_asked:
            self.reporter.info("Feature distillation left out: no stage of the study's space ends in a feature map")
            return None
        # One batch to size the adapters: limited to that batch (the same images, no loader workers started) and
        # closed once read.
        size = self.settings.batch_size
        with closing(
            self.base.data.batches("train", size, shuffle=True, augment=False, seed=self.settings.seed, limit=size)
        ) as batches:
            batch = next(batches)
        features = FeatureDistiller(model, self.base.model, where, self.feature_distill, batch)
        self._distilled = features.describe()
        return features

    def annotate(self, card: dict[str, Any], last_seconds: float) -> None:
        """Record the schedule and the distillation in ``card`` (totals over every step in ``finetune``)."""
        epochs = [round(n / self.steps_per_epoch, 4) for n in self.shares]
        steps = []
        for k in range(1, self.steps + 1):
            entry = self._entry(k) if self.steps > 1 else None
            channels = entry["channels"] if entry else card["channels"]
            seconds = entry.get("seconds") if entry and k < self.steps else last_seconds
            steps.append(
                {
                    "step": k,
                    "channels": channels,
                    "total_channels": sum(channels.values()),
                    "optimizer_steps": self.shares[k - 1],
                    "epochs": epochs[k - 1],
                    "seconds": seconds,
                }
            )
        card["pruning_schedule"] = {
            "prune_steps": self.steps,
            "unpruned_total_channels": sum(self.original.values()),
            "steps": steps,
        }
        card["feature_distill"] = self._distilled or {"weight": 0.0}
        card["finetune"]["steps"] = sum(self.shares) if card["finetune"]["steps"] else 0
        card["finetune"]["seconds"] = round(sum(s["seconds"] or 0.0 for s in steps), 1)

    def discard(self) -> None:
        """Remove the schedule's files (the export is complete)."""
        for k in range(1, self.steps + 1):
            self._weights(k).unlink(missing_ok=True)
            self._state(k).unlink(missing_ok=True)
        self._file.unlink(missing_ok=True)

    def _finetune_step(self, model: nn.Module, k: int, entry: dict[str, Any]) -> None:
        settings, data = self.settings, self.base.data
        state = self._state(k)
        if not state.exists():
            recalibrate_batchnorm(model, data, batches=8, seed=settings.seed + k, device=settings.device)
        train_settings = TrainSettings(
            steps=self.shares[k - 1],
            batch_size=settings.batch_size,
            lr=settings.lr,
            distill=settings.distill,
            train_dtype=settings.train_dtype,
            seed=settings.seed + 1000 * k,  # a different order of batches in every step
            device=settings.device,
        )
        result = train(
            model,
            data,
            train_settings,
            teacher=self.base.model,
            reporter=self.reporter,
            description=f"fine-tune trial {self.trial.number}, prune step {k}/{self.steps}",
            steps_per_epoch=self.steps_per_epoch,
            checkpoint=state,
            features=self.distiller(model),
        )
        partial = self._weights(k).with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        os.replace(partial, self._weights(k))
        entry["finished"] = True
        entry["seconds"] = round(result.seconds, 1)  # the step's training, runs before a resume included
        entry["images_per_second"] = round(result.images_per_second, 1)
        self._save()
        state.unlink(missing_ok=True)
        if k > 1:
            self._weights(k - 1).unlink(missing_ok=True)

    def _entry(self, k: int) -> dict[str, Any] | None:
        return next((s for s in self._record["steps"] if s["step"] == k), None)

    def _weights(self, k: int) -> Path:
        return self.work / f"prune-step-{k}.pt"

    def _state(self, k: int) -> Path:
        return self.work / f"prune-step-{k}-state.pt"

    def _load(self) -> None:
        if not self._file.exists():
            return
        saved = json.loads(self._file.read_text())
        if saved.get("prune_steps") != self.steps or saved.get("optimizer_steps") != self.shares:
            raise UsageError(
                f"the unfinished export in {self.work} was started with --prune-steps {saved.get('prune_steps')} "
                f"and {sum(saved.get('optimizer_steps', []))} fine-tune steps; resume it with the same settings "
                "or delete that folder"
            )
        trained = saved.get("steps") or any(self.work.glob("*state.pt"))  # weights a resume would continue from
        was, now = saved.get("settings", {}), self._record["settings"]
        changed = [f"{k} {was[k]} (now {now[k]})" for k in now if k in was and was[k] != now[k]]
        if changed and trained:
            raise UsageError(
                f"the unfinished export in {self.work} was started with {', '.join(changed)}; resume it with the "
                "same settings, or delete that folder to start again"
            )
        if not changed:
            self._record = saved

    def _save(self) -> None:
        partial = self._file.with_suffix(".partial")
        partial.write_text(json.dumps(self._record))
        os.replace(partial, self._file)

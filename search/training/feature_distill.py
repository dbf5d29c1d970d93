"""Feature distillation: match the pruned model's stage outputs to the unpruned model's.

Logit distillation tells the pruned model what the unpruned one answers; feature distillation
also tells it what the unpruned one computed on the way there. Each stage of the search space
(``layer1``, ``c24``, ...) ends at the last of its modules the forward pass runs; forward hooks
capture that output in the student and the teacher. Where pruning changed the stage's channel
count, a small learned 1x1 convolution (an *adapter*, initialised by least squares on one
training batch) maps the student's channels onto the teacher's; where the counts agree the
outputs are compared directly. The loss of a stage is the mean squared difference divided by
the teacher's mean square there (so stages of any scale weigh alike), averaged over stages.

Adapters belong to the :class:`FeatureDistiller`, never to the student: they train beside it and
are dropped with it, so nothing of them reaches the exported model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from search.errors import UsageError

__all__ = ["FeatureDistiller", "stage_outputs"]


def stage_outputs(
    model: nn.Module, stages: Sequence[tuple[str, Sequence[str]]], example: torch.Tensor
) -> dict[str, str]:
    """For each ``(stage, module prefixes)``, the module whose output ends the stage, by name.

    That is the last of the stage's modules (those named exactly by one of its prefixes) the
    forward pass runs, among those that output a feature map (N×C×H×W). Stages with no such
    module (e.g. the generic space's one stage of the whole model, prefix ``""``) are left out.
    """
    modules = dict(model.named_modules())
    order: list[tuple[str, int]] = []
    hooks = []
    for name in {p for _, prefixes in stages for p in prefixes if p and p in modules}:

        def record(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                order.append((name, len(order)))

        hooks.append(modules[name].register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    last = {name: i for name, i in order}
    found = {}
    for stage, prefixes in stages:
        ran = [p for p in prefixes if p in last]
        if ran:
            found[stage] = max(ran, key=lambda p: last[p])
    return found


class FeatureDistiller(nn.Module):
    """Stage-output matching between ``student`` and ``teacher`` with 1x1 adapters where channels differ.

    Use :meth:`attached` around training: it hooks both models; each training forward of the
    student and then of the teacher leaves their stage outputs for :meth:`loss`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        where: dict[str, str],
        weight: float,
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        super().__init__()
        if not where:
            raise UsageError(
                "--feature-distill: no stage of the study's space ends in a feature map; use --feature-distill 0"
            )
        self.weight = float(weight)
        self.where = dict(where)
        self._student, self._teacher = [student], [teacher]  # in lists: not submodules, never saved with these
        self._seen: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.adapters = nn.ModuleDict()
        with self.attached():
            with torch.no_grad():
                student.eval()(batch[0])
                teacher.eval()(batch[0])
            for stage in self.where:
                s, t = self._seen["student"][stage], self._seen["teacher"][stage]
                if s.shape[1] != t.shape[1]:
                    self.adapters[_key(stage)] = _least_squares_adapter(s.float(), t.float())
        self._clear()

    @property
    def stages(self) -> list[str]:
        return list(self.where)

    def describe(self) -> dict[str, Any]:
        """What the card records: the weight, the stages and the module ending each, the adapted stages."""
        adapted = {stage: self.adapters[_key(stage)] for stage in self.where if _key(stage) in self.adapters}
        return {
            "weight": self.weight,
            "stages": dict(self.where),
            "adapters": {stage: [a.in_channels, a.out_channels] for stage, a in adapted.items()},
        }

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Both models hooked for the block (their stage outputs kept for :meth:`loss`)."""
        hooks = []
        for role, model in (("student", self._student[0]), ("teacher", self._teacher[0])):
            modules = dict(model.named_modules())
            for stage, name in self.where.items():

                def keep(_m: nn.Module, _i: Any, out: torch.Tensor, role: str = role, stage: str = stage) -> None:
                    self._seen[role][stage] = out

                hooks.append(modules[name].register_forward_hook(keep))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._clear()

    def loss(self) -> torch.Tensor:
        """``weight`` times the mean over stages of the normalised squared error of the last forward passes."""
        student, teacher = self._seen["student"], self._seen["teacher"]
        if set(student) != set(self.where) or set(teacher) != set(self.where):
            raise RuntimeError("feature distillation needs a forward pass of both models inside attached()")
        terms = []
        for stage in self.where:
            s = student[stage]
            if _key(stage) in self.adapters:
                s = self.adapters[_key(stage)](s)
            t = teacher[stage].detach().float()
            terms.append(((s.float() - t) ** 2).mean() / (t**2).mean().clamp_min(1e-8))
        self._clear()
        return self.weight * torch.stack(terms).mean()

    def _clear(self) -> None:
        self._seen = {"student": {}, "teacher": {}}


def _key(stage: str) -> str:
    """The adapter's name in the ModuleDict (which refuses dots; a stage of a grouped family is
    named like ``trunk_output.block3``)."""
    return stage.replace(".", "__")


def _least_squares_adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Conv2d:
    """A 1x1 conv from the student's channels to the teacher's, fitted by least squares on these outputs."""
    cs, ct = student.shape[1], teacher.shape[1]
    conv = nn.Conv2d(cs, ct, kernel_size=1, bias=True)
    s = student.permute(0, 2, 3, 1).reshape(-1, cs)
    t = teacher.permute(0, 2, 3, 1).reshape(-1, ct)
    ones = torch.ones(len(s), 1)
    solution = torch.linalg.lstsq(torch.cat([s, ones], dim=1), t, driver="gelsd").solution  # (cs + 1) x ct
    with torch.no_grad():
        conv.weight.copy_(solution[:cs].T.reshape(ct, cs, 1, 1))
        conv.bias.copy_(solution[cs])
    return conv

"""The terminal side: a rich-backed Reporter and the tables the CLI prints. Only the CLI uses it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from search.study.front import Row
from search.study.origin import origin
from search.study.retry import retry_of
from search.study.rungs import Rung
from search.study.uncertainty import wilson

__all__ = ["RichReporter", "export_summary", "front_table", "show_trial"]


LOG_EVERY_S = 30.0
"""Off a terminal (a log, a pipe) the bars do not draw: each task prints a plain line this often instead."""


class _RichTask:
    def __init__(self, reporter: RichReporter, task: TaskID, description: str) -> None:
        self._reporter = reporter
        self._progress = reporter.progress
        self._task = task
        self._description = description
        self._started = self._last = time.monotonic()

    def advance(self, steps: int = 1, **fields: Any) -> None:
        extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=steps, extra=extra)
        now = time.monotonic()
        if not self._reporter.console.is_terminal and now - self._last >= self._reporter.log_every:
            self._last = now
            self._reporter.console.print(self._line(now, extra), highlight=False, markup=False)

    def _line(self, now: float, extra: str) -> str:
        task = next(t for t in self._progress.tasks if t.id == self._task)
        done, total = task.completed, task.total
        elapsed = now - self._started
        parts = [f"{self._description}: {done:g}" + (f"/{total:g} ({done / total:.0%})" if total else "")]
        parts.append(f"{elapsed:.0f} s")
        if total and done:
            parts.append(f"about {elapsed * (total - done) / done:.0f} s left")
        if extra:
            parts.append(extra)
        return ", ".join(parts)


class RichReporter:
    """Live progress bars plus log lines printed above them."""

    def __init__(self, console: Console, *, verbose: bool = True, log_every: float = LOG_EVERY_S) -> None:
        self.console = console
        self.verbose = verbose
        self.log_every = log_every
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=console,
        )
        self._status: TaskID | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        self._status = self.progress.add_task("starting", total=None, extra="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self.progress.remove_task(self._status)
            self._status = None
        self.progress.stop()

    def info(self, message: str) -> None:
        if self.verbose:
            self.progress.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        self.progress.console.print(Text.assemble(("warning: ", "yellow"), message))

    def phase(self, name: str) -> None:
        if self._status is not None:
            self.progress.update(self._status, description=f"[cyan]{name}")

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_RichTask]:
        task = self.progress.add_task(description, total=total, extra="")
        try:
            yield _RichTask(self, task, description)
        finally:
            if description == "trials":
                self.progress.update(task, visible=True)
            else:
                self.progress.remove_task(task)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _with_interval(r: Row) -> str:
    """The accuracy and, when known, half its Wilson 95% interval in points: ``84.30% ±1.6``."""
    margin = r.margin
    return _percent(r.accuracy) + ("" if margin is None else f" ±{margin * 100:.1f}")


def _rung_cell(r: Row) -> str:
    """``1/60``: the rung the top-1 comes from and the fine-tune steps behind it (``-``: not evaluated)."""
    if r.accuracy is None:
        return "-"
    return f"{r.rung}/{r.steps}" if r.steps is not None else f"{r.rung}/-"


def front_table(
    title: str, shown: list[Row], *, budget_ms: float, recommended: Row | None, tied: bool = False
) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for name, justify in [
        ("trial", "right"),
        ("top-1", "right"),
        ("rung", "right"),
        ("before FT", "right"),
        ("latency ms", "right"),
        ("of base", "right"),
        ("p90 ms", "right"),
        ("MMACs", "right"),
        ("params M", "right"),
        ("budget", "center"),
        ("policy", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in shown:
        mark = "[green]meets[/]" if r.latency_ms <= budget_ms else "[red]over[/]"
        if r.at_edge:
            mark = "[yellow]edge[/]"
        label = r.recipe or r.policy.describe()
        number = f"{r.number}"
        if recommended is not None and r.number == recommended.number:
            number = f"[bold green]*{r.number}[/]"
        table.add_row(
            number,
            _with_interval(r),
            _rung_cell(r),
            _percent(r.accuracy_before),
            f"{r.latency_ms:.2f}" + (f" x{len(r.latency_repeats)}" if r.latency_repeats else ""),
            f"{r.ratio:.0%}",
            f"{r.p90_ms:.2f}",
            f"{r.macs / 1e6:.0f}",
            f"{r.params / 1e6:.2f}",
            mark,
            Text(label),
        )
    if recommended is not None and any(r.number == recommended.number for r in shown):
        table.caption = "* the recommended trial: the most accurate within the budget" + (
            ", or the fastest of those tied with it" if tied else ""
        )
        if any(r.margin is not None for r in shown):
            table.caption += "; ± is half the top-1's Wilson 95% interval, in points"
        table.caption += (
            "; rung: where the top-1 comes from, R/steps (0: the brief fine-tune; higher: promoted, "
            "fine-tuned on and read on more validation images: all, or --rung-val-images of them)"
        )
    if any(r.latency_repeats for r in shown):
        table.caption = (table.caption + "; " if table.caption else "") + (
            "xN: the median of N more timings, each in a fresh process (on a latency target: N requests); edge: "
            "within the budget by that median, not in every one of them"
        )
    if table.caption:
        table.caption_justify = "left"
    return table


def _top1_cell(a: dict[str, Any]) -> str:
    record = a.get("accuracy_record") or {}
    if not record.get("interval") or not record.get("images"):
        return f"{a['accuracy']:.4f}"
    low, high = record["interval"]
    paired = ", per-image record kept for paired comparison" if record.get("per_image") else ""
    return f"{a['accuracy']:.4f} (Wilson 95% interval {low:.4f}-{high:.4f} on {record['images']} images{paired})"


def _rung_line(r: Rung) -> str:
    interval = ""
    if r.images:
        low, high = wilson(round(r.accuracy * r.images), r.images)
        interval = f" (Wilson 95% interval {low:.4f}-{high:.4f} on {r.images} images)"
    took = f", {r.seconds:.1f} s" if r.seconds is not None else ""
    return f"{r.accuracy:.4f}{interval} after {r.steps} fine-tune steps{took}"


def show_trial(
    trial: Any,
    budget_ms: float,
    rungs: list[Rung] | None = None,
    learned: float | None = None,
    again: dict[str, Any] | None = None,
) -> Table:
    """One trial as a two-column table: policy, measurements, phase times, channels (and each rung it reached, with
    ``learned``, the accuracy the sampler learns from where it is not the trial's own value, and ``again``, its
    latency timed again in fresh processes)."""
    a = trial.user_attrs
    table = Table(title=f"Trial {trial.number}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    lat = a.get("latency", {})
    evaluated = a.get("fine_tuned") or a.get("recipe") == "unpruned"
    table.add_row("recipe", Text(origin(a) or "sampled by TPE"))
    retried = retry_of(trial)
    if retried is not None:
        table.add_row("retry of", f"trial {retried} (its run did not finish; this trial ran its policy again)")
    table.add_row("within budget", f"{'yes' if a.get('feasible') else 'no'} (budget {budget_ms:g} ms)")
    table.add_row("top-1 (val)", _top1_cell(a) if evaluated else "- (not fine-tuned)")
    if rungs and len(rungs) > 1:
        table.add_row("highest rung", f"{rungs[-1].rung}: the reports use its top-1 {_rung_line(rungs[-1])}")
        for r in rungs:
            table.add_row(f"rung {r.rung}", _rung_line(r))
    if learned is not None:
        table.add_row(
            "sampler learns",
            f"{learned:.4f}: the highest rung's top-1 less the mean gain of the trials fine-tuned to it, on rung 0's "
            f"scale (the trial's own value stays rung 0's {trial.values[0]:.4f})",
        )
    if a.get("accuracy_before") is not None:
        table.add_row("top-1 before fine-tune", f"{a['accuracy_before']:.4f}")
    table.add_row(
        "latency",
        f"{lat.get('corrected_ms', 0):.3f} ms drift-corrected; measured median {lat.get('median_ms', 0):.3f} ms, "
        f"p90 {lat.get('p90_ms', 0):.3f} ms, {lat.get('ratio', 0):.3f} of the interleaved baseline "
        f"({lat.get('baseline_median_ms', 0):.3f} ms), {lat.get('threads', 1)} thread(s)"
        + (f", reused from trial {lat['reused_from_trial']}" if "reused_from_trial" in lat else ""),
    )
    if again:
        ratios = again["ratios"]
        verdict = "over the budget" if again["corrected_ms"] > budget_ms else "within the budget"
        each = ", ".join(f"{r:.3f}" for r in ratios)
        where = "each in a fresh process" if again.get("fresh_processes", True) else "each a request to the target"
        table.add_row(
            "timed again",
            f"{again['corrected_ms']:.3f} ms, {again['ratio']:.3f} of the baseline: the median of {len(ratios)} "
            f"timings, {where} ({each}), {verdict}; the reports use it",
        )
    table.add_row("MACs / params", f"{a.get('macs', 0) / 1e6:.1f} M / {a.get('params', 0) / 1e6:.3f} M")
    seconds = a.get("seconds", {})
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "-")
    policy = a.get("policy", {})
    for name, stage in policy.get("stages", {}).items():
        table.add_row(
            f"stage {name}", f"stream {stage['stream']:.2f}, inner {stage['inner']:.2f}, {stage['criterion']}"
        )
    table.add_row("round_to", str(policy.get("round_to")))
    channels = a.get("channels", {})
    table.add_row("channels", Text(", ".join(f"{k} {v}" for k, v in channels.items())))
    hw = a.get("hardware", {})
    rt = hw.get("runtime", "onnxruntime")
    table.add_row("hardware", Text(f"{hw.get('cpu')}, {hw.get('threads')} thread(s), {rt} {hw.get(rt)}"))
    if a.get("error"):
        table.add_row("error", Text(a["error"]))
    return table


def export_summary(card: dict[str, Any], out_dir: Any) -> Text:
    acc, lat = card["accuracy"], card["latency"]
    return Text(
        f"Exported trial {card['trial']} to {out_dir}: top-1 on {acc['split']} {acc['after_finetune']:.4f} "
        f"(before fine-tune {acc['before_finetune']:.4f}, baseline {acc['baseline']:.4f}); "
        f"latency {lat['median_ms']:.2f} ms median, {lat['p90_ms']:.2f} ms p90 "
        f"({lat['ratio']:.0%} of the baseline's {lat['baseline_median_ms']:.2f} ms in the same run); "
        f"ONNX check: max abs diff {card['onnx_check']['max_abs_diff']:.1e}, "
        f"top-1 agreement {card['onnx_check']['top1_agreement']:.3f}"
        + (
            f"; INT8 model.int8.onnx: top-1 {card['int8']['top1']:.4f}, agreement with FP32 "
            f"{card['int8']['top1_agreement_with_fp32']:.3f} (FP32 export {card['int8']['fp32_latency_ms']:.2f} ms)"
            if card.get("int8")
            else ""
        )
        + (
            f"; {card['runtime_files']['runtime']} {card['runtime_files']['file']}: top-1 agreement with PyTorch "
            f"{card['runtime_files']['parity']['top1_agreement']:.3f}"
            if card.get("runtime_files")
            else ""
        )
    )

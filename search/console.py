"""The terminal side: a rich-backed Reporter and the tables the CLI prints. Only the CLI uses it."""

from __future__ import annotations

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

from search.report import Row

__all__ = ["RichReporter", "front_table"]


class _RichTask:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1, **fields: Any) -> None:
        extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=steps, extra=extra)


class RichReporter:
    """Live progress bars plus log lines printed above them."""

    def __init__(self, console: Console, *, verbose: bool = True) -> None:
        self.console = console
        self.verbose = verbose
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
            yield _RichTask(self.progress, task)
        finally:
            if description == "trials":
                self.progress.update(task, visible=True)
            else:
                self.progress.remove_task(task)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def front_table(title: str, shown: list[Row], *, budget_ms: float, recommended: Row | None) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for name, justify in [
        ("trial", "right"),
        ("top-1", "right"),
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
        label = r.recipe or r.policy.describe()
        number = f"{r.number}"
        if recommended is not None and r.number == recommended.number:
            number = f"[bold green]*{r.number}[/]"
        table.add_row(
            number,
            _percent(r.accuracy),
            _percent(r.accuracy_before),
            f"{r.latency_ms:.2f}",
            f"{r.ratio:.0%}",
            f"{r.p90_ms:.2f}",
            f"{r.macs / 1e6:.0f}",
            f"{r.params / 1e6:.2f}",
            mark,
            Text(label),
        )
    return table

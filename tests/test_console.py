"""What the CLI prints while long work runs, on a terminal and in a log."""

from __future__ import annotations

import io

from rich.console import Console

from search.cli.console import RichReporter


def _run(log_every: float, terminal: bool) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    with RichReporter(console, log_every=log_every) as reporter, reporter.task("fine-tune", 4) as task:
        for _ in range(4):
            task.advance(1, loss=0.5)
    return [line for line in out.getvalue().splitlines() if line.startswith("fine-tune:")]


def test_off_a_terminal_a_long_task_prints_plain_progress_lines_now_and_then() -> None:
    lines = _run(log_every=0.0, terminal=False)
    assert lines[0].startswith("fine-tune: 1/4 (25%), ") and "s left" in lines[0] and "loss 0.5" in lines[0]
    assert lines[-1].startswith("fine-tune: 4/4 (100%)")
    assert _run(log_every=30.0, terminal=False) == [], "periodic, not a line per step"
    assert _run(log_every=0.0, terminal=True) == [], "a terminal has the bar instead"

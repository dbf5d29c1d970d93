"""Several workers on this machine (``--workers K``), each pinned to its own cores.

Every worker is an ordinary ``cli.py search`` process with ``--cpus`` added: it pins itself
(``os.sched_setaffinity``), gives PyTorch as many threads as it has cores, and measures latency
with the study's ``--threads`` inside those cores, so one worker's fine-tuning does not run on
the core another worker is timing a model on. The launcher starts the first worker, waits until
it has created (or joined) the study, starts the others, and then follows the study through the
storage until all workers have exited. Worker output goes to one log file each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.trial import TrialState

from search.errors import UsageError
from search.progress import NullReporter, Reporter
from search.study.config import SearchConfig
from search.study.coordination import progress
from search.study.creator import is_ready
from search.study.origin import origin
from search.study.storage import load_existing, open_storage

__all__ = [
    "LaunchResult",
    "WorkerProcess",
    "available_cpus",
    "describe_cpus",
    "parse_cpus",
    "pin_to_cpus",
    "plan_cpus",
    "plan_devices",
    "run_local_workers",
    "worker_argv",
]


def available_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0,2"`` or ``"0-3"`` or ``"0-1,4"`` as a sorted tuple of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"must be CPU numbers like 0,1 or 0-3, got {text!r}")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"must be CPU numbers like 0,1 or 0-3, got {text!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def describe_cpus(cpus: Sequence[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ",".join(str(c) for c in cpus)


def plan_cpus(workers: int, threads: int, cpus: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Split ``cpus`` (default: all this process may use) into equal, disjoint shares, one per worker."""
    pool = sorted(cpus) if cpus else available_cpus()
    if workers > len(pool):
        raise UsageError(
            f"--workers {workers} needs {workers} cores (each worker gets its own), but {describe_cpus(pool)} "
            f"{'is' if len(pool) == 1 else 'are'} available; pass --workers {len(pool)} or fewer"
        )
    share = len(pool) // workers
    if threads > share:
        raise UsageError(
            f"--threads {threads} needs {threads} cores per worker, but {workers} workers on "
            f"{len(pool)} cores get {share} each; pass --workers {max(1, len(pool) // threads)}"
        )
    return [tuple(pool[i * share : (i + 1) * share]) for i in range(workers)]


def pin_to_cpus(cpus: Sequence[int], threads: int) -> str:
    """Pin this process to ``cpus`` and size PyTorch's thread pool to match; say what was done."""
    import torch

    allowed = set(available_cpus())
    if not cpus or not set(cpus) <= allowed:
        raise UsageError(f"--cpus {','.join(map(str, cpus))} is not within this machine's CPUs {sorted(allowed)}")
    if threads > len(cpus):
        raise UsageError(
            f"--threads {threads} needs {threads} cores but --cpus gives {len(cpus)}; "
            f"pass more --cpus or fewer --threads"
        )
    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(len(cpus))
    return (
        f"Worker {os.getpid()} pinned to {describe_cpus(cpus)}: PyTorch uses {len(cpus)} "
        f"thread{'s' if len(cpus) > 1 else ''}, ONNX Runtime latency {threads} (within those cores)"
    )


def plan_devices(device: str, workers: int, cuda_devices: int) -> list[str | None]:
    """Each worker's ``--device``: with ``auto`` or ``cuda`` and several GPUs, its own GPU (round robin
    when there are more workers than GPUs); ``None`` keeps the launcher's ``--device`` as it is."""
    if device in ("auto", "cuda") and cuda_devices > 0:
        return [f"cuda:{i % cuda_devices}" for i in range(workers)]
    return [None] * workers


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_argv(argv: Sequence[str], cpus: Sequence[int], device: str | None = None) -> list[str]:
    """The command line of one worker: the launcher's, without ``--workers`` or ``--cpus``, pinned
    (and with ``device`` in place of the launcher's ``--device`` when given)."""
    out: list[str] = []
    skip = False
    dropped = ("--workers", "--cpus", "--device") if device else ("--workers", "--cpus")
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in dropped:
            skip = True
            continue
        if arg.startswith(tuple(f"{flag}=" for flag in dropped)):
            continue
        out.append(arg)
    return [*out, "--cpus", ",".join(str(c) for c in cpus), *(("--device", device) if device else ())]


@dataclass
class WorkerProcess:
    index: int
    cpus: tuple[int, ...]
    log: Path
    process: subprocess.Popen[bytes]
    handle: IO[bytes] = field(repr=False)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def last_error(self) -> str:
        """The worker's one-line ``error:`` (or the last line of its log)."""
        self.handle.flush()
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or ["(no output)"])[-1]


def _start(
    argv: Sequence[str], index: int, cpus: tuple[int, ...], log: Path, device: str | None = None
) -> WorkerProcess:
    handle = open(log, "wb")  # closed by run_local_workers once the worker has exited
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "search.cli", *worker_argv(argv, cpus, device)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # Ctrl-C reaches the launcher, which passes one SIGINT to each worker
    )
    return WorkerProcess(index=index, cpus=cpus, log=log, process=process, handle=handle)


@dataclass
class LaunchResult:
    workers: list[WorkerProcess]
    interrupted: bool = False
    trials_by_worker: dict[int, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[WorkerProcess]:
        """Workers that exited with an error (not those stopped by Ctrl-C)."""
        return [w for w in self.workers if w.returncode not in (0, None, 130)]


def _trial_summary(t: optuna.trial.FrozenTrial, pids: dict[int, int]) -> str:
    attrs = t.user_attrs
    worker = attrs.get("worker") or {}
    who = f"worker {pids[worker['pid']]}" if worker.get("pid") in pids else worker.get("host", "another worker")
    if t.state == TrialState.FAIL:
        return f"Trial {t.number} ({who}): failed: {attrs.get('error', 'worker stopped')}"
    latency = attrs.get("latency", {})
    evaluated = attrs.get("fine_tuned") or attrs.get("recipe") == "unpruned"
    accuracy = f"top-1 {attrs.get('accuracy', 0.0):.4f}" if evaluated else "top-1 -"
    label = origin(attrs)
    recipe = f" [{label}]" if label else ""
    budget = "within budget" if attrs.get("feasible") else "over budget"
    return f"Trial {t.number}{recipe} ({who}): {latency.get('corrected_ms', float('nan')):.2f} ms, {accuracy}, {budget}"


def run_local_workers(
    config: SearchConfig,
    argv: Sequence[str],
    workers: int,
    cpus: Sequence[int] | None = None,
    reporter: Reporter | None = None,
    *,
    poll: float = 2.0,
) -> LaunchResult:
    """Start ``workers`` pinned worker processes on one study and follow it until they all exit."""
    reporter = reporter or NullReporter()
    if config.storage_url.startswith("sqlite"):
        raise UsageError(
            f"--workers {workers} needs a database server: SQLite locks under concurrent writers; "
            f"pass --storage postgresql://USER@HOST/DB (see README, 'Several workers')"
        )
    shares = plan_cpus(workers, config.threads, cpus)
    devices = plan_devices(config.device, workers, _cuda_devices())
    storage = open_storage(config.storage_url)
    logs = Path(config.studies_dir) / config.study_name / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    reporter.info(
        f"Starting {workers} workers on study {config.study_name!r}, each pinned to its own cores so their "
        f"latency measurements do not disturb each other:"
    )
    for i, share in enumerate(shares, 1):
        gpu = f", {devices[i - 1]}" if devices[i - 1] else ""
        reporter.info(f"  worker {i}: {describe_cpus(share)}{gpu}, log {logs / f'worker-{i}.log'}")
    result = LaunchResult(workers=[])
    restore = interrupt_on_stop_signals()  # kill, timeout, a closed terminal: the workers stop as on Ctrl-C
    try:
        first = _start(argv, 1, shares[0], logs / "worker-1.log", devices[0])
        result.workers.append(first)
        reporter.phase("worker 1 is preparing the study (baseline, recipes)")
        while not _study_ready(storage, config.study_name):
            if first.returncode is not None:
                return result
            time.sleep(poll / 4)
        for i, share in enumerate(shares[1:], 2):
            result.workers.append(_start(argv, i, share, logs / f"worker-{i}.log", devices[i - 1]))
        _follow(storage, config, result, reporter, poll)
    except KeyboardInterrupt:
        result.interrupted = True
        for w in result.workers:
            if w.returncode is None:
                w.process.send_signal(signal.SIGINT)  # each worker stops cleanly; its trial is retried later
        for w in result.workers:
            try:
                w.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
    finally:
        restore()
        for w in result.workers:
            w.handle.close()
    return result


def interrupt_on_stop_signals() -> Callable[[], None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (in the main thread); returns what puts the handlers back.

    The workers run in sessions of their own, so only the launcher hears these: without this it died and left
    them searching unattended."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore


def _study_ready(storage: Any, name: str) -> bool:
    study = load_existing(storage, name)
    return study is not None and is_ready(study)


def _follow(storage: Any, config: SearchConfig, result: LaunchResult, reporter: Reporter, poll: float) -> None:
    """Report each trial as it finishes, with a progress bar, until every worker has exited."""
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    pids = {w.process.pid: w.index for w in result.workers}
    seen = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))}
    with reporter.task("trials", config.trials) as bar:
        shown = min(progress(study).finished, config.trials)
        bar.advance(shown)
        while True:
            running = [w for w in result.workers if w.returncode is None]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                if t.number in seen:
                    continue
                seen.add(t.number)
                index = pids.get((t.user_attrs.get("worker") or {}).get("pid"))
                if index is not None:
                    result.trials_by_worker[index] = result.trials_by_worker.get(index, 0) + 1
                reporter.info(_trial_summary(t, pids))
            done = min(progress(study).finished, config.trials)
            bar.advance(done - shown)
            shown = done
            if not running:
                return
            reporter.phase(f"{len(running)} worker{'s' if len(running) > 1 else ''} running")
            time.sleep(poll)

"""GPU check: a small search and an export on a CUDA GPU, against the same search on the CPU (issue #25).

A prepared script of a few minutes for a machine with a GPU. It installs the project into a virtual
environment it creates (``--system-site-packages``, ``pip install --no-build-isolation -e .``, so an
offline machine with PyTorch installed works; ``--current`` uses this Python and the working tree
instead), then runs, as a user would, ``cli.py search --device cuda`` on a CIFAR-10 subset of a few
hundred images (cut from the shared CIFAR-10 where present, else the built-in scikit-learn digits),
``cli.py export --best`` from it on the GPU, and the same search with ``--device cpu``. The search runs
with its promotion defaults where it has promotion (its ``--help`` says so), otherwise without, and the
output says which. Reported: trials per minute on each device (whole search, and trials alone), the GPU's
speed-up, and the share of each phase of a trial (the seconds every trial records in its ``seconds``
user attribute). Writes ``benchmarks/gpu_check.json`` and the "GPU check" section of BENCHMARKS.md.

    python benchmarks/gpu_check.py            # on the GPU machine: a few minutes
    python benchmarks/gpu_check.py --current  # without creating a venv

Without a CUDA device it prints one line saying it skipped and why, and exits 0. Each search creates its own
study first (baseline timing, recipes, latency-aware tables, all measured on the CPU): on the 2-core
development machine under heavy load a 2-trial CPU search of this check took 19 minutes, nearly all of it
creation (``--devices cpu --trials 2``, a dry run of the plumbing); with 16 idle cores expect a few minutes
per search.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMOTION = re.compile(r"--(promot[\w-]*|rungs?\b[\w-]*)")
"""Flags of a search that promotes its best trials to longer fine-tunes."""


PROMOTED = 3
"""The one rung, in multiples of ``--steps``: named, since one epoch of the subset is shorter than the default rung."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    try:
        import torch
    except ImportError as error:
        return f"PyTorch is not importable in {sys.executable} ({error})"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        return f"PyTorch {torch.__version__} sees no CUDA device on this machine (its CUDA: {built})"
    return None


def python_for(args: argparse.Namespace, work: Path) -> str:
    """The interpreter that runs the CLI: a fresh venv with the project installed, or this one (``--current``)."""
    if args.current:
        return sys.executable
    venv = work / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} (with the system's site packages, so an offline machine keeps its PyTorch)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    log("installing the project: pip install --no-build-isolation -e .")
    started = time.perf_counter()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation", "-e", str(ROOT)], check=True
    )
    log(f"installed in {time.perf_counter() - started:.0f} s")
    return str(python)


def subset(shared: Path, work: Path, per_class: dict[str, int]) -> str:
    """``--data`` for the check: a few hundred CIFAR-10 images per split cut from the shared copy, else digits."""
    source = shared / "data" / "cifar10"
    if not source.is_dir():
        log(f"no shared CIFAR-10 at {source}: using the built-in digits")
        return "digits"
    target = work / "cifar10-subset"
    for split, count in per_class.items():
        for folder in sorted((source / split).iterdir()):
            out = target / split / folder.name
            if out.is_dir() and len(list(out.iterdir())) == count:
                continue
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy2(image, out / image.name)
    return f"imagefolder:{target}"


def cli(python: str, *args: str) -> float:
    """``python cli.py ARGS`` in the repository; its seconds."""
    log("$ cli.py " + " ".join(args))
    started = time.perf_counter()
    subprocess.run([python, "cli.py", *args], cwd=ROOT, check=True)
    return time.perf_counter() - started


def search_help(python: str) -> str:
    done = subprocess.run([python, "cli.py", "search", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def summary(python: str, study_db: Path, study: str, wall: float) -> dict[str, Any]:
    """Trials, their throughput and the share of each phase, read from the study (in the project's Python)."""
    code = f"""
import json, optuna
study = optuna.load_study(study_name={study!r}, storage={f"sqlite:///{study_db}"!r})
done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
out = {{"trials": len(done), "phases": {{}}, "trial_seconds": 0.0, "train_device": None}}
for t in done:
    out["trial_seconds"] += (t.datetime_complete - t.datetime_start).total_seconds()
    for k, v in (t.user_attrs.get("seconds") or {{}}).items():
        out["phases"][k] = out["phases"].get(k, 0.0) + v
    out["train_device"] = out["train_device"] or t.user_attrs.get("train_device")
    for k in ("rungs", "rung", "promotion", "promoted"):
        if k in t.user_attrs:
            out.setdefault("promotion_attrs", {{}})[k] = out.get("promotion_attrs", {{}}).get(k, 0) + 1
print(json.dumps(out))
"""
    done = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    phases = got["phases"]
    recorded = sum(phases.values())
    other = max(0.0, got["trial_seconds"] - recorded)
    total = recorded + other
    got["share"] = {k: round(v / total, 3) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])} if total else {}
    if total:
        got["share"]["other (not in a phase)"] = round(other / total, 3)
    got["search_seconds"] = round(wall, 1)
    got["trials_per_minute"] = round(60 * got["trials"] / wall, 2) if wall else None
    got["trials_per_minute_trials_alone"] = (
        round(60 * got["trials"] / got["trial_seconds"], 2) if got["trial_seconds"] else None
    )
    return got


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python = python_for(args, work)
    data = subset(
        Path(args.shared),
        work,
        {"train": args.images // 10, "val": max(10, args.images // 40), "test": max(10, args.images // 40)},
    )
    helptext = search_help(python)
    promotion = sorted(set(PROMOTION.findall(helptext)))
    log(
        f"promotion flags in `search --help`: {', '.join('--' + f for f in promotion)} (one rung of "
        f"{PROMOTED}x --finetune-steps is named)"
        if promotion
        else "this version's search has no promotion (no --promotion/--rungs flag): the searches run without it"
    )
    weights = Path(args.shared) / "models" / "cifar10_resnet18.pth"
    model_args = ["--model", "resnet18_cifar"]
    if data.startswith("imagefolder") and weights.is_file():
        model_args += ["--weights", str(weights), "--mean", "0.4914,0.4822,0.4465", "--std", "0.2470,0.2435,0.2616"]
    else:
        model_args += ["--baseline-epochs", "2"]
    studies = work / "studies"
    if studies.exists():
        shutil.rmtree(studies)  # every run measures afresh
    results: dict[str, Any] = {}
    for device in args.devices:
        study = f"gpu-check-{device}"
        wall = cli(
            python,
            "search",
            *model_args,
            *("--data", data, "--input-size", "32", "--budget-fraction", "0.5", "--precision", "fp32"),
            *("--trials", str(args.trials), "--finetune-steps", str(args.steps), "--finetune-batch", "64"),
            *(("--rungs", str(PROMOTED * args.steps)) if promotion else ()),
            *("--device", device, "--study", study, "--studies-dir", str(studies), "--quiet"),
        )
        results[device] = summary(python, studies / f"{study}.db", study, wall)
        log(f"{device}: {json.dumps(results[device])}")
        if device == args.devices[0]:
            export = cli(
                python,
                *("export", "--best", "--epochs", "1", "--device", device, "--study", study),
                *("--studies-dir", str(studies), "--out", str(work / "export"), "--force", "--quiet"),
            )
            results[f"export_seconds_{device}"] = round(export, 1)
    if "cuda" in results and "cpu" in results and results["cpu"]["trials_per_minute"]:
        gpu, cpu = results["cuda"], results["cpu"]
        results["speedup_trials_per_minute"] = round(gpu["trials_per_minute"] / cpu["trials_per_minute"], 2)
        alone = "trials_per_minute_trials_alone"
        results["speedup_trials_alone"] = round(gpu[alone] / cpu[alone], 2) if cpu[alone] else None
    return {
        "data": data,
        "model": model_args,
        "trials": args.trials,
        "finetune_steps": args.steps,
        "promotion_flags": promotion,
        "promotion": bool(promotion),
        **results,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_name": _cpu(),
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def render(result: dict[str, Any]) -> str:
    gpu, cpu = result["cuda"], result["cpu"]
    device = (gpu.get("train_device") or {}).get("name", "a CUDA GPU")
    lines = [
        f"`python benchmarks/gpu_check.py` on {result['date']}: {device} against {result['cpu_name']}; "
        f"{result['trials']} trials of {result['finetune_steps']} steps, data `{result['data']}`, "
        + (
            f"with promotion (one rung of {PROMOTED * result['finetune_steps']} steps, named: the subset's epoch is "
            "shorter than the default rung, which would leave none)."
            if result["promotion"]
            else "without promotion (not in this version)."
        ),
        "",
        "| device | trials | search s | trials/min | trials/min (trials alone) | phase shares |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in (("cuda", gpu), ("cpu", cpu)):
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["share"].items())
        lines.append(
            f"| {name} | {r['trials']} | {r['search_seconds']:.0f} | {r['trials_per_minute']} "
            f"| {r['trials_per_minute_trials_alone']} | {shares} |"
        )
    lines += [
        "",
        f"GPU over CPU, trials per minute: {result['speedup_trials_per_minute']}× (whole search, study creation "
        f"included), {result.get('speedup_trials_alone')}× (trials alone); "
        f"export --best (1 epoch) on the GPU: {result['export_seconds_cuda']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--current", action="store_true", help="use this Python and the working tree (no venv, no install)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / ".gpu-check"), help="working folder")
    p.add_argument("--shared", default=str(_shared()), help="the shared material's folder")
    p.add_argument("--images", type=int, default=400, help="training images of the subset (a tenth per class)")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="brief fine-tune steps per trial")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.json"))
    p.add_argument(
        "--devices",
        nargs="+",
        choices=["cuda", "cpu"],
        default=["cuda", "cpu"],
        help="devices to search on, the first also exports (--devices cpu: a dry run of the plumbing without a GPU)",
    )
    p.add_argument("--no-section", action="store_true", help="do not write the BENCHMARKS.md section")
    args = p.parse_args()
    reason = skip_reason() if "cuda" in args.devices else None
    if reason is not None:
        print(f"gpu_check: skipped: {reason}")
        return 0
    try:
        result = run(args)
    except subprocess.CalledProcessError as error:
        command = " ".join(str(a) for a in error.cmd[:4])
        hint = (
            "" if args.current else " (offline without the dependencies? try --current in an environment that has them)"
        )
        print(f"gpu_check: failed: `{command} ...` exited with status {error.returncode}{hint}")
        return 1
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")
    if "speedup_trials_per_minute" not in result:
        log(f"no GPU in this run ({', '.join(args.devices)}): nothing to compare; the section is left as it is")
        return 0
    print(render(result))
    if not args.no_section:
        sys.path.insert(0, str(ROOT))
        from benchmarks.sections import write_section

        write_section("GPU check", render(result))
    return 0


def _shared() -> Path:
    """The shared material: beside the repository (``../shared``) or inside it (``shared/``)."""
    for candidate in (ROOT.parent / "shared", ROOT / "shared"):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared"


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``cli.py serve`` under a bounded concurrent load on loopback, against ONNX Runtime alone.

The models: a study's pruned INT8 model (the most accurate pruned INT8 trial within a budget of a
fraction of the baseline's latency, exported) and its unpruned FP32 model (trial 0, exported: the
baseline's own weights). On the shared CIFAR-10 baseline when ``../shared`` is there (32 px, a real
CIFAR-10 test JPEG as the request), else on the built-in digits at 224 px (the default run's setting).

For each model, served alone by ``cli.py serve`` (its defaults: 1 thread per session, as many
requests at once as cores), measured in one run:

- ONNX Runtime's own latency for the same file, same threads, batch 1 (median and p99), in this process;
- a load from a second process (:func:`search.serving.load.run_load`): 1 client (the per-request
  overhead: the server's p50 against ONNX Runtime's median) and 8 clients for 30 s (requests/s, p50,
  p99), with the CPU seconds the server and the load client spent per request;
- the time from starting ``serve`` to its first answer, alone and with ``--baseline``.

Writes ``benchmarks/serve.json`` and the "Serving" section of BENCHMARKS.md.

    python benchmarks/serve.py            # about 15 minutes on the 2-core dev machine (a quiet one)
    python benchmarks/serve.py --quick    # a minute or two on tiny digits: checks the script, writes nothing
    python benchmarks/serve.py --render   # rewrite the section from serve.json

Side by side with another checkout's ``cli.py serve`` (say ``git worktree add /tmp/main main``), on
the same exports and the same load client, in alternating rounds (this, other, this, ...); prints
each one's requests/s and the ratio, writes nothing:

    python benchmarks/serve.py --compare /tmp/main --work /tmp/serve-bench    # --quick for a check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402

SECTION = "Serving"
OUT = ROOT / "benchmarks" / "serve.json"
SHARED = ROOT.parent / "shared"
FULL = {"clients": 8, "seconds": 30.0, "single_seconds": 15.0, "ort_runs": 2000, "trials": 10, "export_steps": 300}
QUICK = {"clients": 8, "seconds": 4.0, "single_seconds": 2.0, "ort_runs": 200, "trials": 9, "export_steps": 4}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _reporter() -> Any:
    """Progress as log lines (info, warnings and phases; no bars)."""
    from search.progress import NullReporter

    class LogReporter(NullReporter):
        def info(self, message: str) -> None:
            log(message)

        def warn(self, message: str) -> None:
            log(f"warning: {message}")

        def phase(self, name: str) -> None:
            log(f"- {name}")

    return LogReporter()


def setup(quick: bool, work: Path, budget_fraction: float) -> dict[str, Any]:
    """A study and two exports (pruned INT8, unpruned FP32); the request image."""
    import optuna

    from search.data.spec import CIFAR10_MEAN, CIFAR10_STD, DataSpec
    from search.shipping.export import export_trial
    from search.shipping.rebuild import load_study_baseline
    from search.shipping.settings import ExportSettings
    from search.study.config import SearchConfig
    from search.study.front import rows
    from search.study.run import run_search

    work.mkdir(parents=True, exist_ok=True)
    cifar = SHARED / "data" / "cifar10"
    weights = SHARED / "models" / "cifar10_resnet18.pth"
    sizes = QUICK if quick else FULL
    common = {"trials": sizes["trials"], "val_images": 300, "studies_dir": str(work / "studies"), "study": "serve"}
    if not quick and cifar.is_dir() and weights.is_file():
        data = DataSpec(f"imagefolder:{cifar}", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        config = SearchConfig(
            budget_fraction=budget_fraction,
            model="resnet18_cifar",
            weights=str(weights),
            data=data,
            finetune_steps=20,
            **common,
        )
        image = sorted((cifar / "test" / "cat").glob("*.jpg"))[0]
        what = "CIFAR-10 (shared), resnet18_cifar at 32 px; request: a CIFAR-10 test JPEG"
    else:
        size = 32 if quick else 224
        config = SearchConfig(
            budget_fraction=budget_fraction,
            data=DataSpec("digits", input_size=size),
            baseline_epochs=1 if quick else 3,
            finetune_steps=2 if quick else 20,
            bn_batches=2,
            **common,
        )
        image = work / "digit.png"
        _digit_png(image)
        what = f"digits, resnet18 at {size} px (baseline trained here); request: an 8x8 digit PNG"
    log(f"search: {what}")
    reporter = _reporter()
    run_search(config, reporter)
    study = optuna.load_study(study_name="serve", storage=config.storage_url)
    found = rows(study)
    pruned = [r for r in found if r.feasible and r.precision == "int8" and not r.policy.is_unpruned and r.accuracy]
    if not pruned:
        raise SystemExit(f"no pruned INT8 trial within the budget; INT8 check: {study.user_attrs.get('int8_check')}")
    best = max(pruned, key=lambda r: (r.accuracy, -r.latency_ms))
    unpruned = next(r for r in found if r.policy.is_unpruned and r.precision == "fp32")
    base = load_study_baseline(study, reporter=reporter)
    settings = ExportSettings(steps=sizes["export_steps"], test_images=1000)
    if quick:  # a baseline trained for one epoch has small margins: INT8 flips more of its argmaxes
        settings = replace(settings, min_int8_agreement=0.5)
    exports = {}
    for key, row in (("int8_pruned", best), ("fp32_unpruned", unpruned)):
        log(f"export trial {row.number} ({row.recipe or 'sampled'}, {row.precision})")
        exports[key] = work / "export" / f"trial-{row.number}"
        if (exports[key] / "card.json").exists():  # a --work folder of an earlier run: measure the same files
            log(f"reusing {exports[key]}")
            continue
        export_trial(
            base, row.number, settings, exports[key], command="benchmarks/serve.py", force=True, reporter=reporter
        )
    return {"what": what, "studies": work / "studies", "exports": exports, "image": image}


def _digit_png(path: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = np.rint(load_digits().images[-1] * (255 / 16)).astype(np.uint8)
    Image.fromarray(digit).save(path)


def onnxruntime_latency(model: Path, runs: int, input_size: int) -> dict[str, float]:
    """ONNX Runtime alone on the file the server serves: 1 thread, batch 1, after a warm-up."""
    import numpy as np

    from search.measuring.timing import open_session

    session = open_session(str(model), 1)
    x = np.random.default_rng(0).standard_normal((1, 3, input_size, input_size)).astype(np.float32)
    for _ in range(max(20, runs // 20)):
        session.run(None, {"input": x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - started) * 1000.0)
    times.sort()
    return {"median_ms": round(statistics.median(times), 4), "p99_ms": round(times[int(0.99 * len(times))], 4)}


def start_serve(args: list[str], checkout: Path = ROOT) -> tuple[subprocess.Popen[str], str, float]:
    """``cli.py serve ARGS --port 0`` of ``checkout``: the process, its URL, and when it was started (perf_counter)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "serve", *args, "--port", "0", "-q"],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("serving on "):
            return proc, line.split()[2].rstrip("/"), started
    raise RuntimeError(f"serve did not start (exit {proc.wait()})")


def first_answer(url: str, image: bytes, started: float) -> float:
    """Seconds from ``started`` to the first 200 from ``POST /predict``."""
    request = urllib.request.Request(f"{url}/predict", data=image, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
    return round(time.perf_counter() - started, 3)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, image: bytes, clients: int, seconds: float, server_pid: int) -> dict[str, Any]:
    """The load from a process of its own; with the CPU seconds per request of server and client."""
    script = (
        "import json, sys, time; from search.serving.load import run_load; c = time.process_time(); "
        f"r = run_load({url!r}, sys.stdin.buffer.read(), clients={clients}, seconds={seconds}); "
        "r['client_cpu_s'] = round(time.process_time() - c, 3); print(json.dumps(r))"
    )
    before = cpu_seconds(server_pid)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, input=image, capture_output=True, check=True)
    result = json.loads(done.stdout)
    result["server_cpu_s"] = round(cpu_seconds(server_pid) - before, 3)
    n = max(1, result["requests"])
    result["server_cpu_ms_per_request"] = round(1000 * result["server_cpu_s"] / n, 3)
    result["client_cpu_ms_per_request"] = round(1000 * result["client_cpu_s"] / n, 3)
    return result


def measure(setup_: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    image = Path(setup_["image"]).read_bytes()
    results: dict[str, Any] = {}
    for key, folder in setup_["exports"].items():
        card = json.loads((folder / "card.json").read_text())
        model = folder / ("model.int8.onnx" if card["precision"] == "int8" else "model.onnx")
        log(f"{key}: ONNX Runtime alone on {model.name}")
        ort_before = onnxruntime_latency(model, sizes["ort_runs"], card["preprocessing"]["input_size"])
        proc, url, started = start_serve([str(folder)])
        try:
            to_first = first_answer(url, image, started)
            log(f"{key}: first answer {to_first} s after start; 1 client for {sizes['single_seconds']} s")
            single = load(url, image, 1, sizes["single_seconds"], proc.pid)
            log(f"{key}: {sizes['clients']} clients for {sizes['seconds']} s")
            loaded = load(url, image, sizes["clients"], sizes["seconds"], proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        ort_after = onnxruntime_latency(model, sizes["ort_runs"], card["preprocessing"]["input_size"])
        ort_ms = (ort_before["median_ms"] + ort_after["median_ms"]) / 2
        results[key] = {
            "trial": card["trial"],
            "recipe": card["recipe"],
            "precision": card["precision"],
            "file": model.name,
            "macs": card["macs"],
            "top1": card["accuracy"]["after_finetune"],
            "onnxruntime": {"before": ort_before, "after": ort_after, "median_ms": round(ort_ms, 4)},
            "single_client": single,
            "loaded": loaded,
            "overhead_ratio_single": round(single["p50_ms"] / ort_ms, 3),
            "overhead_ms_single": round(single["p50_ms"] - ort_ms, 3),
            "ideal_requests_per_second": round((os.cpu_count() or 1) * 1000.0 / ort_ms, 1),
            "first_answer_s": to_first,
        }
    pruned = setup_["exports"]["int8_pruned"]
    proc, url, started = start_serve([str(pruned), "--baseline", "--studies-dir", str(setup_["studies"])])
    try:
        results["first_answer_with_baseline_s"] = first_answer(url, image, started)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def compare(setup_: dict[str, Any], sizes: dict[str, Any], other: Path, rounds: int) -> dict[str, Any]:
    """Requests/s of this checkout's server and ``other``'s, in alternating rounds on the same exports."""
    image = Path(setup_["image"]).read_bytes()
    results: dict[str, Any] = {}
    for key, folder in setup_["exports"].items():
        rates: dict[str, list[float]] = {"this": [], "other": []}
        cpu: dict[str, list[float]] = {"this": [], "other": []}
        for _ in range(rounds):
            for name, checkout in (("this", ROOT), ("other", other)):
                proc, url, started = start_serve([str(folder)], checkout)
                try:
                    first_answer(url, image, started)
                    done = load(url, image, sizes["clients"], sizes["seconds"], proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                if done["failed"] or set(done["statuses"]) != {"200"}:
                    raise SystemExit(f"{name} ({checkout}) did not answer every request: {done}")
                rates[name].append(done["requests_per_second"])
                cpu[name].append(done["server_cpu_ms_per_request"])
                log(f"{key}: {name} {done['requests_per_second']} requests/s, {cpu[name][-1]} server CPU ms each")
        this, theirs = statistics.median(rates["this"]), statistics.median(rates["other"])
        results[key] = {
            "requests_per_second": rates,
            "server_cpu_ms_per_request": cpu,
            "this_median": this,
            "other_median": theirs,
            "ratio": round(this / theirs, 4),
            "cpu_ratio": round(statistics.median(cpu["this"]) / statistics.median(cpu["other"]), 4),
        }
        log(f"{key}: this {this:.1f} vs other {theirs:.1f} requests/s, ratio {this / theirs:.3f}")
    return results


def render(result: dict[str, Any]) -> str:
    m = result["models"]
    lines = [
        f"`python benchmarks/serve.py` ({result['date']}, git {result['git'][:10]}; {result['cpu']}, "
        f"{result['cpus']} logical CPUs). {result['what']}. Each model is served alone by `cli.py serve` "
        "(uvicorn, 1 worker process, 1 ONNX Runtime thread per session, as many requests at once as cores); "
        f"the load comes from a second process on loopback, {result['sizes']['clients']} keep-alive clients for "
        f"{result['sizes']['seconds']:g} s (1 client for {result['sizes']['single_seconds']:g} s for the overhead). "
        "ONNX Runtime alone: the same file, same thread count, batch 1, in the benchmark's process, before and "
        "after the load.",
        "",
        "| model | ONNX Runtime alone, median | 1 client: p50 (overhead) | "
        f"{result['sizes']['clients']} clients: requests/s | p50 / p99 | ideal requests/s | "
        "server / client CPU ms per request | in ONNX Runtime, of the server's CPU | start to first answer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (("int8_pruned", "pruned INT8"), ("fp32_unpruned", "unpruned FP32")):
        r = m[key]
        one, many = r["single_client"], r["loaded"]
        lines.append(
            f"| {label} (trial {r['trial']}, {r['macs'] / 1e6:.0f} M MACs, top-1 {r['top1']:.3f}) | "
            f"{r['onnxruntime']['median_ms']:.2f} ms | {one['p50_ms']:.2f} ms ({r['overhead_ratio_single']:.2f}x, "
            f"+{r['overhead_ms_single']:.2f} ms) | {many['requests_per_second']:.0f} | "
            f"{many['p50_ms']:.1f} / {many['p99_ms']:.1f} ms | {r['ideal_requests_per_second']:.0f} | "
            f"{many['server_cpu_ms_per_request']:.2f} / {many['client_cpu_ms_per_request']:.2f} | "
            f"{many['inference_ms_mean'] / many['server_cpu_ms_per_request']:.0%} | "
            f"{r['first_answer_s']:.1f} s |"
        )
    lines += [
        "",
        f"With `--baseline` (the pruned INT8 model and the study's unpruned model, exported to ONNX at start), "
        f"the first answer came {m['first_answer_with_baseline_s']:.1f} s after starting `serve`.",
        "",
        '"Ideal requests/s" is the CPUs divided by ONNX Runtime\'s own median: what the model alone would give '
        "on every core with nothing else running. The server's and the load client's CPU time per request say "
        "what the rest costs on this 2-core machine, where the load generator shares the cores with the server; "
        "\"in ONNX Runtime\" is the mean time the answers report inside the model's run over the server's CPU time "
        "per request (the remainder is HTTP, multipart, decoding, preprocessing and JSON in Python).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny digits and short loads: checks the script")
    parser.add_argument("--render", action="store_true", help="rewrite the section from serve.json")
    parser.add_argument("--budget-fraction", type=float, default=0.2, help="the study's budget (default: 0.2)")
    parser.add_argument(
        "--work", help="folder for the study and exports, reused by a later run (default: a temporary one)"
    )
    parser.add_argument(
        "--compare", metavar="CHECKOUT", help="another checkout of this repository: its server side by side with this"
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: rounds each (default: 3)")
    args = parser.parse_args()
    if args.compare:
        other = Path(args.compare).resolve()
        if not (other / "cli.py").is_file():
            raise SystemExit(f"{other} has no cli.py; pass a checkout of this repository")
        sizes = QUICK if args.quick else FULL
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            made = setup(args.quick, Path(args.work) if args.work else Path(tmp), args.budget_fraction)
            print(json.dumps(compare(made, sizes, other, 1 if args.quick else args.rounds), indent=2))
        return
    if args.render:
        write_section(SECTION, render(json.loads(OUT.read_text())))
        return
    from search.measuring.hardware import fingerprint, git_revision

    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        made = setup(args.quick, work, args.budget_fraction)
        models = measure(made, sizes)
    hardware = fingerprint(1)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "git": git_revision() or "unknown",
        "cpu": hardware.get("cpu"),
        "cpus": os.cpu_count(),
        "what": made["what"],
        "sizes": sizes,
        "budget_fraction": args.budget_fraction,
        "models": models,
    }
    print(json.dumps(models, indent=2))
    if args.quick:
        print(render(result))
        log("--quick: nothing written")
        return
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    write_section(SECTION, render(result))
    log(f"wrote {OUT} and the {SECTION!r} section of BENCHMARKS.md")


if __name__ == "__main__":
    main()

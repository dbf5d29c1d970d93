"""Benchmark: images on disk read a batch at a time against every image decoded into memory, in one run.

On the shared CIFAR-10 images (``../shared/data/cifar10``) enlarged to 224 px, the training split
(45,000 images; ``--images N`` takes the first N/10 of each class) is loaded two ways, each in a
subprocess of its own so that its peak resident memory is its own:

1. **in memory** (the loading before issue #15): every image decoded at 224x224 into one uint8
   tensor, batches cut from it with the padded random crop and flip;
2. **on disk** (now): decoded once at 256x256 into the cache file, then read a batch at a time
   (``pread``), random resized crop and flip; also the second load (the cache reused), and the
   same pipeline with loader worker processes.

For each: peak RSS, seconds to decode, and input-pipeline images/s (shuffled, augmented,
normalised batches of 64, nothing else running). Then a ResNet-18 fine-tune at 224 px, in a third
subprocess: images/s when each step's batch comes from the on-disk loader against a loop over the
same batches already in memory, alternated round by round so drift cancels (the loader should
cost under 10%). Where a CUDA device is present the fine-tune is also measured on it; where none
is, the GPU section says so and claims nothing.

    python benchmarks/data_pipeline.py            > benchmarks/data_pipeline.log   # ~10 min, 45,000 images
    python benchmarks/data_pipeline.py --quick    # 2,000 images, a minute or two; writes no section

Writes ``benchmarks/data_pipeline.json`` and the "Data pipeline" section of BENCHMARKS.md (other
sections are kept); ``--quick`` writes ``benchmarks/data_pipeline.quick.json`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "Data pipeline"
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train"
SIZE = 224
BATCH = 64
FINETUNE_BATCH = 32


def _subset(out: Path, images: int) -> Path:
    """``out/train/<class>/`` (the first images/10 files of each class) and a small ``out/val/``, as links."""
    classes = sorted(p.name for p in SHARED_TRAIN.iterdir() if p.is_dir())
    per_class = images // len(classes)
    for name in classes:
        files = sorted((SHARED_TRAIN / name).iterdir())
        for split, chosen in (("train", files[:per_class]), ("val", files[-20:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (folder / f.name).symlink_to(f)
                f.read_bytes()  # in the page cache before either loading reads it: neither pays for a cold disk
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pipeline(data: Any, images: int) -> float:
    """Images/s of shuffled, augmented, normalised training batches (nothing else done with them)."""
    started = time.perf_counter()
    seen = 0
    for x, _ in data.batches("train", BATCH, shuffle=True, augment=True, seed=1, limit=images):
        seen += len(x)
    return seen / (time.perf_counter() - started)


def child_memory(root: Path, images: int) -> dict[str, Any]:
    """The loading before issue #15: every training image decoded at 224 into memory."""
    from search.data.dataset import Dataset, Split
    from search.data.imagefolder import _decode_split, _imagefolder_lists
    from search.data.spec import IMAGENET_MEAN, IMAGENET_STD, DataSpec
    from search.data.store import MemorySink
    from search.progress import NullReporter

    classes, lists = _imagefolder_lists(root, DataSpec(f"imagefolder:{root}", input_size=SIZE), NullReporter())
    started = time.perf_counter()

    class _Quiet:
        def advance(self, steps: int = 1, **fields: Any) -> None:
            pass

    splits = {}
    for name in ("train", "val"):
        sink = MemorySink(len(lists[name].files), SIZE, SIZE)
        labels, _ = _decode_split(lists[name], SIZE, _Quiet(), sink)
        splits[name] = Split(sink.result(), labels)
    decode = time.perf_counter() - started
    data = Dataset(
        "imagefolder", classes, splits["train"], splits["val"], None, SIZE, IMAGENET_MEAN, IMAGENET_STD, True, "x"
    )
    return {
        "decode_seconds": round(decode, 1),
        "images_per_second": round(_pipeline(data, images), 1),
        "peak_rss_mb": round(_peak_rss_mb()),
        "held_in_memory_mb": round(data.train.images.numel() / 2**20),
    }


def child_disk(root: Path, images: int, workers: int) -> dict[str, Any]:
    """Now: decoded once into the cache file, read a batch at a time; the second load reuses it."""
    from search.data.loading import load_dataset
    from search.data.spec import DataSpec

    spec = DataSpec(f"imagefolder:{root}", input_size=SIZE)
    started = time.perf_counter()
    data = load_dataset(spec)
    decode = time.perf_counter() - started
    started = time.perf_counter()
    data = load_dataset(spec)
    reuse = time.perf_counter() - started
    alone = _pipeline(data, images)
    data.loader_workers = workers
    with_workers = _pipeline(data, images)
    return {
        "decode_seconds": round(decode, 1),
        "reuse_seconds": round(reuse, 2),
        "images_per_second": round(alone, 1),
        "images_per_second_with_workers": round(with_workers, 1),
        "workers": workers,
        "stored_size": data.train.images.shape[-1],
        "file_mb": round(data.train.images.path.stat().st_size / 2**20),
        "peak_rss_mb": round(_peak_rss_mb()),
        "transforms": data.transforms(),
    }


class _InMemory:
    """The same batches, already made: what :func:`train` sees when nothing has to be loaded."""

    def __init__(self, data: Any, batches: list[tuple[Any, Any]]) -> None:
        self._data, self._batches = data, batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def batches(self, *args: Any, **kwargs: Any) -> Any:
        yield from self._batches


def child_finetune(root: Path, steps: int, rounds: int, device: str) -> dict[str, Any]:
    """ResNet-18 fine-tune images/s: batches from the on-disk loader against the same batches in memory."""
    import torch

    from search.data.loading import load_dataset
    from search.data.spec import DataSpec
    from search.models.build import build_model
    from search.training.device import loader_plan, resolve
    from search.training.finetune import TrainSettings, train

    target = resolve(device)
    data = load_dataset(DataSpec(f"imagefolder:{root}", input_size=SIZE))  # the cache written by the disk child
    data.loader_workers, data.pin_memory = loader_plan(target)
    made = list(data.batches("train", FINETUNE_BATCH, shuffle=True, augment=True, seed=0, limit=FINETUNE_BATCH * steps))
    in_memory = _InMemory(data, made)
    torch.manual_seed(0)
    model = build_model("resnet18", data.num_classes)
    settings = TrainSettings(steps=steps, batch_size=FINETUNE_BATCH, lr=0.01, device=str(target))
    speeds: dict[str, list[float]] = {"loader": [], "in_memory": []}
    for round_ in range(rounds + 1):  # round 0 warms up both and is not counted
        for name, source in (("loader", data), ("in_memory", in_memory)):
            result = train(model, source, settings)
            if round_:
                speeds[name].append(result.images_per_second)
    loader, memory = statistics.median(speeds["loader"]), statistics.median(speeds["in_memory"])
    return {
        "device": str(target),
        "steps_per_round": steps,
        "rounds": rounds,
        "batch": FINETUNE_BATCH,
        "loader_workers": data.loader_workers,
        "loader_images_per_second": round(loader, 2),
        "in_memory_images_per_second": round(memory, 2),
        "loader_cost": round(1 - loader / memory, 4),
        "all": {k: [round(v, 2) for v in vs] for k, vs in speeds.items()},
        "threads": torch.get_num_threads(),
    }


def _run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images and short rounds; writes no section")
    parser.add_argument("--images", type=int, help="training images (default: 45,000; 2,000 with --quick)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, root, *rest = args.child
        runs = {
            "memory": lambda: child_memory(Path(root), int(rest[0])),
            "disk": lambda: child_disk(Path(root), int(rest[0]), int(rest[1])),
            "finetune": lambda: child_finetune(Path(root), int(rest[0]), int(rest[1]), rest[2]),
        }
        print(json.dumps(runs[kind]()))
        return
    if not SHARED_TRAIN.is_dir():
        raise SystemExit(f"{SHARED_TRAIN} is not present; this benchmark needs the shared CIFAR-10 images")
    images = args.images or (2000 if args.quick else 45000)
    pipeline_images = min(images, 1000 if args.quick else 12800)
    steps, rounds = (4, 2) if args.quick else (8, 3)
    began = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = _subset(Path(tmp) / "cifar10", images)
        env = dict(os.environ, PRUNE_SEARCH_CACHE=str(Path(tmp) / "cache"))
        print(f"[{time.perf_counter() - began:6.0f}s] {images} training images at {SIZE} px", flush=True)
        memory = _run_child(["memory", str(root), str(pipeline_images)], env)
        print(f"[{time.perf_counter() - began:6.0f}s] in memory: {memory}", flush=True)
        disk = _run_child(["disk", str(root), str(pipeline_images), "1"], env)
        print(f"[{time.perf_counter() - began:6.0f}s] on disk: {disk}", flush=True)
        finetune = _run_child(["finetune", str(root), str(steps), str(rounds), "cpu"], env)
        print(f"[{time.perf_counter() - began:6.0f}s] fine-tune: {finetune}", flush=True)
        gpu = _gpu(root, steps, rounds, env)
    result = {
        "command": "python benchmarks/data_pipeline.py"
        + (" --quick" if args.quick else "")
        + (f" --images {args.images}" if args.images else ""),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_at_start": round(load, 2),
        "training_images": images,
        "pipeline_images": pipeline_images,
        "input_size": SIZE,
        "in_memory": memory,
        "on_disk": disk,
        "finetune": finetune,
        "gpu": gpu,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    name = "data_pipeline.quick.json" if args.quick else "data_pipeline.json"
    (ROOT / "benchmarks" / name).write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        from benchmarks.sections import write_section

        write_section(SECTION, section(result))
    print(json.dumps(result, indent=2))


def _gpu(root: Path, steps: int, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    return {
        "available": True,
        "name": torch.cuda.get_device_name(0),
        **_run_child(["finetune", str(root), str(steps * 4), str(rounds), "cuda"], env),
    }


def _cpu() -> str:
    import torch

    from search.training.device import device_record

    return device_record(torch.device("cpu"))["name"]


def section(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    mem, disk, ft, gpu = r["in_memory"], r["on_disk"], r["finetune"], r["gpu"]
    lines = [
        f"`{r['command']}` on {r['date']}, {r['cpu']} ({r['cores']} cores, load average {r['load_average_at_start']} "
        f"at the start), {r['wall_seconds'] / 60:.1f} min. The shared CIFAR-10 training images "
        f"({r['training_images']:,}) enlarged to {r['input_size']} px; input-pipeline speed over "
        f"{r['pipeline_images']:,} shuffled, augmented, normalised images in batches of {BATCH}, each loading in "
        "a subprocess of its own (peak RSS is that process's, PyTorch included). Raw numbers: "
        "`benchmarks/data_pipeline.json`.",
        "",
        "| loading | peak RSS | decode | images/s | notes |",
        "| --- | --- | --- | --- | --- |",
        f"| in memory (before #15) | {mem['peak_rss_mb']:,} MB | {mem['decode_seconds']} s | "
        f"{mem['images_per_second']:,.0f} | {mem['held_in_memory_mb']:,} MB of decoded images held; padded crop |",
        f"| on disk, this process | {disk['peak_rss_mb']:,} MB | {disk['decode_seconds']} s (reused: "
        f"{disk['reuse_seconds']} s) | {disk['images_per_second']:,.0f} | a {disk['file_mb']:,} MB file at "
        f"{disk['stored_size']} px; random resized crop |",
        f"| on disk, {disk['workers']} loader worker(s) | | | {disk['images_per_second_with_workers']:,.0f} | |",
        "",
        f"Fine-tune (ResNet-18, {ft['device']}, batch {ft['batch']}, {ft['steps_per_round']} steps per round, median "
        f"of {ft['rounds']} alternated rounds, {ft['loader_workers']} loader workers as `--device cpu` picks here): "
        f"{ft['loader_images_per_second']} images/s reading from disk against {ft['in_memory_images_per_second']} "
        f"over the same batches already in memory: the loader costs {ft['loader_cost']:.1%}.",
        "",
    ]
    if gpu["available"]:
        lines.append(
            f"GPU ({gpu['name']}): fine-tune {gpu['loader_images_per_second']} images/s with the loader "
            f"({gpu['loader_workers']} workers, pinned memory) against {gpu['in_memory_images_per_second']} in memory."
        )
    else:
        lines.append("GPU: no CUDA device was available on this machine, so nothing is claimed about GPUs here.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

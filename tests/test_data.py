"""Loading data sets: what a user of ``--data`` would notice."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search.data.cache import DECODED_CACHE_ENV
from search.data.dataset import Dataset
from search.data.loading import default_input_size, load_dataset
from search.data.spec import CIFAR10_MEAN, IMAGENET_MEAN, DataSpec
from search.data.store import DiskImages
from search.errors import UsageError
from search.progress import RecordingReporter

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


# --------------------------------------------------------------------------- helpers


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _make_folder(root: Path, classes: dict[str, int], ext: str = "png") -> None:
    """``root/<class>/<i>.<ext>`` with ``count`` solid-colour images per class."""
    for k, (name, count) in enumerate(classes.items()):
        for i in range(count):
            _write_image(root / name / f"{i:03d}.{ext}", (40 * k, 100 + i, 200 - 30 * k))


def _identity(split: torch.Tensor) -> set[bytes]:
    return {bytes(image.numpy().tobytes()) for image in split}


def _write_cifar(folder: Path, per_batch: int = 12, names: tuple[str, ...] = ("a", "b", "c")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [i % len(names) for i in range(per_batch)],
            b"batch_label": name.encode(),
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(content, handle)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in names]}, handle)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataSpec("digits", input_size=32))


# --------------------------------------------------------------------------- digits


def test_digits_loads_ten_classes_with_disjoint_splits(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.classes == [str(d) for d in range(10)]
    assert digits.test is not None
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sum(sizes) == 1797
    assert 0.65 < sizes[0] / 1797 < 0.75 and 0.12 < sizes[1] / 1797 < 0.18
    assert digits.train.images.dtype == torch.uint8 and digits.train.images.shape[1:] == (3, 8, 8)
    assert digits.train.labels.dtype == torch.int64
    for split in (digits.train, digits.val, digits.test):
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class everywhere
    assert not digits.flip


def test_digits_split_is_deterministic_per_seed(digits: Dataset) -> None:
    again = load_dataset(DataSpec("digits", input_size=32))
    assert torch.equal(again.val.images, digits.val.images)
    assert again.fingerprint == digits.fingerprint
    other = load_dataset(DataSpec("digits", input_size=32, seed=1))
    assert not torch.equal(other.val.labels, digits.val.labels) or not torch.equal(other.val.images, digits.val.images)
    assert other.fingerprint != digits.fingerprint


@pytest.mark.parametrize("size", [32, 224])
def test_digits_batches_are_normalised_at_input_size(size: int) -> None:
    data = load_dataset(DataSpec("digits", input_size=size))
    assert data.input_size == size
    batches = list(data.batches("val", 64, shuffle=False, augment=False, limit=100))
    assert [len(y) for _, y in batches] == [64, 36]
    x, y = batches[0]
    assert x.shape == (64, 3, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.3
    assert data.example_input(2).shape == (2, 3, size, size)


def test_batches_shuffle_and_augment_follow_the_seed(digits: Dataset) -> None:
    def first(seed: int, augment: bool) -> torch.Tensor:
        return next(digits.batches("train", 16, shuffle=True, augment=augment, seed=seed))[0]

    assert torch.equal(first(3, True), first(3, True))
    assert not torch.equal(first(3, False), first(4, False))
    plain = next(digits.batches("train", 16, shuffle=True, augment=False, seed=3))[0]
    assert first(3, True).shape == plain.shape
    in_order = next(digits.batches("train", 5, shuffle=False, augment=False))[1]
    assert torch.equal(in_order, digits.train.labels[:5])


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"zebra": 3, "apple": 2, "mango": 2}, "png")
    _make_folder(tmp_path / "val", {"zebra": 1, "apple": 1, "mango": 1}, "jpg")
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=16), reporter)
    assert data.classes == ["apple", "mango", "zebra"]
    assert (len(data.train), len(data.val), data.test) == (7, 3, None)
    assert data.train.images.shape == (7, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert data.flip and data.mean == IMAGENET_MEAN
    assert reporter.steps["decode images"] == 10
    assert not reporter.warnings
    x, _ = next(data.batches("train", 4, shuffle=True, augment=True))
    assert x.shape == (4, 3, 16, 16)
    with pytest.raises(UsageError, match="no test split"):
        next(data.batches("test", 4, shuffle=False, augment=False))
    cached = RecordingReporter()
    again = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=16), cached)
    assert again.fingerprint == data.fingerprint
    assert "decode images" not in cached.steps, "a second load reads the decoded images kept by the first"
    assert torch.equal(again.train.images[:], data.train.images[:]) and torch.equal(again.val.labels, data.val.labels)
    _make_folder(tmp_path / "val", {"zebra": 2}, "jpg")  # a file added: decoded again
    changed = RecordingReporter()
    assert len(load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=16), changed).val) == 4
    assert changed.steps["decode images"] == 11
    assert load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8)).fingerprint != (data.fingerprint)


def test_imagefolder_optional_test_split(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        _make_folder(tmp_path / split, {"cat": 2, "dog": 2})
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8))
    assert data.test is not None and len(data.test) == 4


def test_imagefolder_train_without_val_holds_out_part_of_train(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"cat": 10, "dog": 10})
    _make_folder(tmp_path / "test", {"cat": 2, "dog": 2})
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8), reporter)
    assert (len(data.train), len(data.val)) == (18, 2)
    assert data.test is not None and len(data.test) == 4
    assert any("no val/ folder" in line for line in reporter.infos)


def test_imagefolder_decodes_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "gray").mkdir()
    (tmp_path / "rgba").mkdir()
    Image.new("L", (9, 9), 128).save(tmp_path / "gray" / "a.PGM")
    Image.new("L", (9, 9), 30).save(tmp_path / "gray" / "b.JPG")
    Image.new("RGBA", (9, 9), (255, 0, 0, 128)).save(tmp_path / "rgba" / "a.png")
    Image.new("P", (9, 9), 3).save(tmp_path / "rgba" / "b.bmp")
    (tmp_path / "rgba" / "notes.txt").write_text("ignored: not an image extension")
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=9, val_fraction=0.5), reporter)
    assert len(data.train) + len(data.val) == 4
    assert not reporter.warnings


def test_imagefolder_single_folder_is_split_per_class(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"cat": 10, "dog": 10})
    spec = DataSpec(f"imagefolder:{tmp_path}", input_size=8, val_fraction=0.2)
    data = load_dataset(spec)
    assert data.classes == ["cat", "dog"]
    assert (len(data.train), len(data.val), data.test) == (16, 4, None)
    assert data.val.labels.tolist() == [0, 0, 1, 1]
    again = load_dataset(spec)
    assert torch.equal(again.val.images[:], data.val.images[:])
    assert again.fingerprint == data.fingerprint
    assert load_dataset(DataSpec(spec.source, input_size=8, val_fraction=0.2, seed=5)).fingerprint != (data.fingerprint)


def test_imagefolder_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 0, 255), (10, 0, 20, 10))  # blue middle third
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        wide.save(tmp_path / name / "x.png")
        wide.save(tmp_path / name / "y.png")
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=10, val_fraction=0.5))
    image = data.train.images[0]
    assert image.shape == (3, 10, 10)
    assert image[2, 5, 5] > 200 and image[0, 5, 5] < 50  # the centre crop is the blue part


def test_corrupt_images_are_skipped_with_one_warning(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"a": 3, "b": 3})
    _make_folder(tmp_path / "val", {"a": 1, "b": 1})
    for i in range(2):
        (tmp_path / "train" / "a" / f"bad{i}.jpg").write_bytes(b"not an image at all")
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8), reporter)
    assert len(data.train) == 6
    assert len(reporter.warnings) == 1
    assert "skipped 2 unreadable images in train/" in reporter.warnings[0]
    assert "bad0.jpg" in reporter.warnings[0]


def test_folder_of_only_corrupt_images_is_a_usage_error(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="could be decoded"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8), RecordingReporter())


def test_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path / 'nope'}"))


def test_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is empty"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}"))


def test_folder_without_class_folders_is_a_usage_error(tmp_path: Path) -> None:
    _write_image(tmp_path / "loose.png", (1, 2, 3))
    with pytest.raises(UsageError, match=r"no images found.*<class>/<image>"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}"))


def test_single_class_is_a_usage_error(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"only": 4})
    with pytest.raises(UsageError, match="at least 2"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8))


def test_class_mismatch_between_train_and_val_is_a_usage_error(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _make_folder(tmp_path / "val", {"cat": 1, "cow": 1})
    with pytest.raises(UsageError, match=r"different class folders.*dog.*cow"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=8))


def test_too_large_for_memory_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECODED_CACHE_ENV, "")  # the cache off: images would be held in memory
    _make_folder(tmp_path, {"cat": 2, "dog": 2})
    with pytest.raises(UsageError, match="--input-size"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=20000))


# --------------------------------------------------------------------------- spec errors


def test_unknown_source_lists_accepted_forms() -> None:
    with pytest.raises(UsageError, match=r"unknown data source.*digits.*imagefolder:PATH.*cifar10"):
        load_dataset(DataSpec("mnist:/tmp"))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (DataSpec("digits", input_size=0), "positive"),
        (DataSpec("digits", mean=(0.5, 0.5)), "3 values"),  # type: ignore[arg-type]
        (DataSpec("digits", std=(0.2, 0.2, 0.2, 0.2)), "3 values"),  # type: ignore[arg-type]
        (DataSpec("digits", std=(0.2, 0.0, 0.2)), "positive"),
        (DataSpec("digits", val_fraction=1.5), "between 0 and 1"),
        (DataSpec("imagefolder"), "imagefolder:PATH"),
    ],
)
def test_bad_spec_is_a_usage_error(spec: DataSpec, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        load_dataset(spec)


def test_default_input_sizes() -> None:
    assert default_input_size("digits") == 224
    assert default_input_size("cifar10:/data") == 32
    assert default_input_size("imagefolder:/data") == 224
    with pytest.raises(UsageError):
        default_input_size("svhn")


def test_explicit_normalisation_is_used() -> None:
    data = load_dataset(DataSpec("digits", input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3))
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------- cifar10


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_pickles_load(tmp_path: Path, nested: bool) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    data = load_dataset(DataSpec(f"cifar10:{tmp_path}"))
    assert data.name == "cifar10" and data.classes == ["a", "b", "c"]
    assert (len(data.train), len(data.val)) == (54, 6)  # last 10% of each class held out
    assert data.test is not None and len(data.test) == 12
    assert data.train.images.shape == (54, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.input_size == 32 and data.mean == CIFAR10_MEAN and data.flip
    x, y = next(data.batches("test", 8, shuffle=False, augment=False))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    upscaled = load_dataset(DataSpec(f"cifar10:{tmp_path}", input_size=64))
    assert next(upscaled.batches("val", 4, shuffle=False, augment=True))[0].shape == (4, 3, 64, 64)


def test_cifar10_missing_file_is_named_with_the_download_alternative(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(UsageError, match=r"data_batch_3 is missing; .*pass plain --data cifar10 to download it"):
        load_dataset(DataSpec(f"cifar10:{tmp_path}"))


def test_cifar10_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset(DataSpec(f"cifar10:{tmp_path / 'absent'}"))


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"{SHARED_CIFAR10} is not present")
def test_real_cifar10_image_folder() -> None:
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{SHARED_CIFAR10}", input_size=32), reporter)
    assert data.num_classes == 10 and data.classes[0] == "airplane"
    assert data.test is not None
    assert len(data.train) + len(data.val) + len(data.test) == reporter.steps["decode images"]
    assert not reporter.warnings
    batches = list(data.batches("val", 100, shuffle=True, augment=False, limit=300))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (100, 3, 32, 32) and int(y.max()) < 10
    assert abs(float(x.mean())) < 1.0


def test_a_folder_of_small_images_without_input_size_is_named_once(tmp_path: Path) -> None:
    for k, name in enumerate(("cat", "dog")):
        for i in range(3):
            _write_image(tmp_path / name / f"{i}.png", (80 * k, 60, 90), size=(32, 32))
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}"), reporter)
    assert data.input_size == 224, "the default still applies"
    said = [w for w in reporter.warnings if "far smaller than the default input size 224" in w]
    assert len(said) == 1 and "--input-size 32" in said[0]
    reporter = RecordingReporter()
    load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=32), reporter)
    assert not [w for w in reporter.warnings if "far smaller" in w], "not when the size was chosen"


# --------------------------------------------------------------------------- images on disk, transforms


def _load_in_process(root: str, start: object, queue: object) -> None:
    """Child of the concurrent-cache test: wait for the sibling, load, report whether it decoded."""
    start.wait()  # type: ignore[attr-defined]
    reporter = RecordingReporter()
    data = load_dataset(DataSpec(f"imagefolder:{root}", input_size=16), reporter)
    queue.put(("decode images" in reporter.steps, data.train.images[:].numpy().tobytes()))  # type: ignore[attr-defined]


def test_decoded_images_stay_on_disk_and_memory_does_not_grow_with_them(tmp_path: Path) -> None:
    sizes = []
    for count in (4, 40):
        root = tmp_path / str(count)
        _make_folder(root, {"cat": count, "dog": count})
        data = load_dataset(DataSpec(f"imagefolder:{root}", input_size=16, val_fraction=0.25))
        assert isinstance(data.train.images, DiskImages) and data.train.images.path.is_file()
        sizes.append(len(pickle.dumps(data.train.images)))  # what a loader worker is handed
    assert sizes[0] == sizes[1], "a split on disk is a path and a few numbers, whatever its size"


def test_images_read_from_disk_equal_images_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_folder(tmp_path, {"cat": 6, "dog": 6})
    on_disk = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=12, val_fraction=0.25))
    monkeypatch.setenv(DECODED_CACHE_ENV, "")
    in_memory = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=12, val_fraction=0.25))
    assert isinstance(in_memory.train.images, torch.Tensor)
    assert torch.equal(on_disk.train.images[:], in_memory.train.images)
    assert torch.equal(on_disk.train.images[[5, 0, 3]], in_memory.train.images[[5, 0, 3]])
    first = next(on_disk.batches("val", 8, shuffle=False, augment=False))[0]
    assert torch.equal(first, next(in_memory.batches("val", 8, shuffle=False, augment=False))[0])


def test_two_processes_starting_together_decode_once(tmp_path: Path) -> None:
    import multiprocessing

    _make_folder(tmp_path / "data", {"cat": 30, "dog": 30})
    context = multiprocessing.get_context("fork")
    start, queue = context.Barrier(2), context.Queue()
    children = [context.Process(target=_load_in_process, args=(str(tmp_path / "data"), start, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(decoded for decoded, _ in results) == [False, True], "one decodes, the other reads its file"
    assert results[0][1] == results[1][1]
    folder = Path(os.environ[DECODED_CACHE_ENV]) / "decoded"
    assert not list(folder.glob("*.partial")), "no partial file is left behind"


def test_augmentation_follows_the_seed_whatever_the_number_of_loader_workers(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"cat": 20, "dog": 20})
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=16, val_fraction=0.25))

    def epoch(seed: int, workers: int) -> list[torch.Tensor]:
        data.loader_workers = workers
        return [x for x, _ in data.batches("train", 4, shuffle=True, augment=True, seed=seed)]

    alone = epoch(3, 0)
    assert all(torch.equal(a, b) for a, b in zip(alone, epoch(3, 2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(alone, epoch(4, 0), strict=True))


def test_full_size_inputs_train_on_random_resized_crops_and_evaluate_on_the_centre(tmp_path: Path) -> None:
    image = Image.new("RGB", (200, 200), (255, 0, 0))
    image.paste((0, 0, 255), (50, 50, 150, 150))  # a blue centre in a red frame
    for name in ("a", "b"):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            image.save(tmp_path / name / f"{i}.png")
    data = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=128, val_fraction=0.5))
    assert data.crop == "resized" and data.train.images.shape[-1] == 146  # 128 / 0.875: room to crop
    assert data.transforms()["evaluation"] == "centre crop 128 of 146"
    assert "random resized crop" in data.transforms()["train"] and "flip" in data.transforms()["train"]
    passes = [next(data.batches("val", 2, shuffle=False, augment=False))[0] for _ in range(2)]
    assert passes[0].shape == (2, 3, 128, 128) and torch.equal(passes[0], passes[1]), "evaluation is fixed"
    trained = [next(data.batches("train", 2, shuffle=True, augment=True, seed=s))[0] for s in (1, 1, 2)]
    assert trained[0].shape == (2, 3, 128, 128)
    assert torch.equal(trained[0], trained[1]) and not torch.equal(trained[0], trained[2])
    small = load_dataset(DataSpec(f"imagefolder:{tmp_path}", input_size=32, val_fraction=0.5))
    assert small.crop == "pad" and "reflect padding 4" in small.transforms()["train"]
    assert small.fingerprint != data.fingerprint


def test_a_disk_without_room_for_the_decoded_images_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    _make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10, 10, 0))
    with pytest.raises(UsageError, match=rf"GiB are free.*{DECODED_CACHE_ENV}"):
        load_dataset(DataSpec(f"imagefolder:{tmp_path / 'data'}", input_size=8))

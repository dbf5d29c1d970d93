"""Data that changes between runs: the decoded-image cache, the study's record of the data, and what a
refused rerun names."""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from search.data.cache import DECODED_CACHE_ENV
from search.data.loading import load_dataset
from search.data.spec import DataSpec
from search.errors import UsageError
from search.progress import RecordingReporter
from search.study.config import SearchConfig
from search.study.create import _warn_near_chance
from search.study.settings import STUDY_FORMAT, check_resumable, settings_that_must_match


@pytest.fixture()
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(DECODED_CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bmp(path: Path, color: tuple[int, int, int]) -> None:
    """An uncompressed 16x16 image: every colour gives a file of the same byte size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format="BMP")


def _folder(root: Path) -> None:
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            for i in range(3):
                _bmp(root / split / name / f"{i}.bmp", (80 * k, 10 * i, 50))


def _replace_in_place(path: Path, color: tuple[int, int, int]) -> None:
    """Another image of the same byte size, as a copy or an edit would leave it (a later mtime)."""
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    _bmp(path, color)
    assert path.stat().st_size == size
    os.utime(path, ns=(mtime + 5 * 10**9, mtime + 5 * 10**9))


def _entries(cache_root: Path) -> list[Path]:
    return sorted((cache_root / "decoded").glob("*.bin"))


def test_an_image_replaced_by_one_of_the_same_size_is_decoded_again(cache_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    before = load_dataset(spec)
    assert before.val.images[0][0, 0, 0].item() == 0  # val/cat/0.bmp is (0, 0, 50)
    _replace_in_place(root / "val" / "cat" / "0.bmp", (255, 255, 255))
    after = load_dataset(spec)
    assert after.val.images[0][0, 0, 0].item() == 255  # the new pixels, not the cached old ones
    assert after.content_sha256 != before.content_sha256
    assert after.fingerprint == before.fingerprint  # names and sizes, as existing studies stored it
    assert len(_entries(cache_root)) == 1  # the entry of the old files is removed


def test_a_changed_cifar10_batch_of_the_same_size_is_decoded_again(cache_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 200, (10, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1] * 5}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}))
    before = load_dataset(DataSpec(f"cifar10:{tmp_path}"))
    test = folder / "test_batch"
    size, mtime = test.stat().st_size, test.stat().st_mtime_ns
    test.write_bytes(pickle.dumps({b"data": np.full((10, 3072), 250, dtype=np.uint8), b"labels": [0, 1] * 5}))
    assert test.stat().st_size == size
    os.utime(test, ns=(mtime + 5 * 10**9, mtime + 5 * 10**9))
    after = load_dataset(DataSpec(f"cifar10:{tmp_path}"))
    assert after.test is not None and int(after.test.images[0].min()) == 250
    assert after.content_sha256 != before.content_sha256 and after.fingerprint == before.fingerprint
    assert len(_entries(cache_root)) == 1


def test_the_content_hash_survives_a_copy_with_new_mtimes_and_the_cache_being_off(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _folder(root)
    cached = load_dataset(DataSpec(f"imagefolder:{root}", input_size=16)).content_sha256
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # new mtimes, as on another machine
    assert load_dataset(DataSpec(f"imagefolder:{copy}", input_size=16)).content_sha256 == cached
    monkeypatch.setenv(DECODED_CACHE_ENV, "")
    assert load_dataset(DataSpec(f"imagefolder:{root}", input_size=16)).content_sha256 == cached


# --------------------------------------------------------------------------- resuming a study


def _settings(data: object, config: SearchConfig) -> dict:
    return settings_that_must_match(config, data, SimpleNamespace(text="space"), SimpleNamespace(sha256="abc"))


def _study(stored: dict) -> SimpleNamespace:
    return SimpleNamespace(user_attrs={"settings": stored})


def test_a_resumed_study_refuses_data_whose_files_changed(cache_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    config = SearchConfig(budget_ms=10, data=spec)
    stored = _settings(load_dataset(spec), config)
    check_resumable(_study(stored), _settings(load_dataset(spec), config), config)  # unchanged: resumes
    _replace_in_place(root / "train" / "dog" / "2.bmp", (1, 2, 3))
    with pytest.raises(UsageError, match=r"different --data \(its files' contents\).*replaced or edited"):
        check_resumable(_study(stored), _settings(load_dataset(spec), config), config)


def test_a_study_stored_before_the_content_hash_still_resumes(cache_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    config = SearchConfig(budget_ms=10, data=spec)
    stored = _settings(load_dataset(spec), config)
    for key in ("data_files", "mean", "std"):  # what an existing study's settings lack
        del stored[key]
    check_resumable(_study(stored), _settings(load_dataset(spec), config), config)


def test_a_study_written_by_a_later_version_is_refused_in_one_line_and_one_before_the_format_resumes(
    cache_root: Path, tmp_path: Path
) -> None:
    """A worker must not misread records a later version wrote (its study format, or settings it does not know)."""
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    config = SearchConfig(budget_ms=10, data=spec, study="mine")
    here = _settings(load_dataset(spec), config)
    assert here["format"] == STUDY_FORMAT
    later = {**here, "format": STUDY_FORMAT + 1}
    with pytest.raises(UsageError) as refused:
        check_resumable(_study(later), here, config)
    said = str(refused.value)
    assert "\n" not in said and f"study format {STUDY_FORMAT + 1}, this version reads up to {STUDY_FORMAT}" in said
    assert "install the same version on every worker" in said
    with pytest.raises(UsageError, match=r"settings this version does not know: warmup_steps"):
        check_resumable(_study({**here, "warmup_steps": 5}), here, config)
    before = {k: v for k, v in here.items() if k != "format"}  # a study made before the number existed
    check_resumable(_study(before), here, config)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mean": (0.5, 0.5, 0.5)}, r"different --mean \(0\.485,0\.456,0\.406, now 0\.5,0\.5,0\.5\)"),
        ({"std": (0.25, 0.25, 0.25)}, r"different --std \(0\.229,0\.224,0\.225, now 0\.25,0\.25,0\.25\)"),
        ({"input_size": 8}, r"different --input-size \(16, now 8\)"),
    ],
)
def test_a_rerun_that_changes_only_the_input_size_mean_or_std_names_it(
    cache_root: Path, tmp_path: Path, change: dict, named: str
) -> None:
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    config = SearchConfig(budget_ms=10, data=spec)
    stored = _settings(load_dataset(spec), config)
    with pytest.raises(UsageError, match=named):
        check_resumable(_study(stored), _settings(load_dataset(replace(spec, **change)), config), config)


def test_an_older_study_refusing_changed_data_says_what_the_hash_covers(cache_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    spec = DataSpec(f"imagefolder:{root}", input_size=16)
    config = SearchConfig(budget_ms=10, data=spec)
    stored = {"data_fingerprint": load_dataset(spec).fingerprint}  # an existing study: no mean/std recorded
    with pytest.raises(UsageError, match=r"different --data \('[0-9a-f]+', now '[0-9a-f]+'\) \(.*--mean or --std\)"):
        check_resumable(_study(stored), _settings(load_dataset(replace(spec, mean=(0.5,) * 3)), config), config)


# --------------------------------------------------------------------------- near chance


def test_a_baseline_trained_here_near_chance_is_not_blamed_on_weights_nobody_gave(digits32: object) -> None:
    reporter = RecordingReporter()
    _warn_near_chance(0.1, digits32, reporter, trained_here=True)  # type: ignore[arg-type]
    (warning,) = reporter.warnings
    assert "near chance" in warning and "--weights were trained" not in warning
    assert "trained here" in warning and "--baseline-epochs" in warning
    reporter = RecordingReporter()
    _warn_near_chance(0.1, digits32, reporter, trained_here=False)  # type: ignore[arg-type]
    assert "check that --weights were trained on this data" in reporter.warnings[0]


def test_entries_of_the_same_folder_held_out_with_other_seeds_are_kept(cache_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for k, name in enumerate(("cat", "dog")):
        for i in range(5):
            _bmp(root / name / f"{i}.bmp", (80 * k, 10 * i, 50))
    for seed in (0, 1):
        load_dataset(DataSpec(f"imagefolder:{root}", input_size=16, seed=seed))
    assert len(_entries(cache_root)) == 2  # two studies with different --seed do not evict each other
    _replace_in_place(root / "cat" / "0.bmp", (9, 9, 9))
    load_dataset(DataSpec(f"imagefolder:{root}", input_size=16, seed=0))
    assert len(_entries(cache_root)) == 2  # seed 0's old entry replaced, seed 1's kept


def test_a_rerun_with_other_data_is_refused_before_a_baseline_is_trained_for_it(tmp_path: Path) -> None:
    import optuna

    from search.study.run import run_search
    from search.study.settings import data_settings

    config = SearchConfig(
        budget_ms=10, data=DataSpec("digits", input_size=32), study="here", studies_dir=str(tmp_path / "studies")
    )
    (tmp_path / "studies").mkdir()
    study = optuna.create_study(study_name="here", storage=config.storage_url)
    study.set_user_attr("settings", data_settings(load_dataset(config.data)))  # no --weights: trained here
    other = replace(config, data=DataSpec("digits", input_size=32, mean=(0.5, 0.5, 0.5)))
    with pytest.raises(UsageError, match=r"different --mean \(0\.3057,0\.3057,0\.3057, now 0\.5,0\.5,0\.5\)"):
        run_search(other)
    assert not (tmp_path / "studies" / "cache").exists()  # no baseline was trained for the other data


def test_an_entry_another_process_still_reads_is_not_removed_under_it(cache_root: Path, tmp_path: Path) -> None:
    """A search's loader workers open the decoded images by path: removing the entry of the old files while it
    runs failed every later trial with FileNotFoundError. The entry goes once no process reads it."""
    import subprocess
    import sys

    root = tmp_path / "data"
    _folder(root)
    reader = subprocess.Popen(
        [sys.executable, "-c", f"from search.data.loading import load_dataset; from search.data.spec import DataSpec; "
         f"load_dataset(DataSpec('imagefolder:{root}', input_size=16)); print('read', flush=True); input()"],
        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "read"
        (old,) = _entries(cache_root)
        _replace_in_place(root / "val" / "cat" / "0.bmp", (255, 255, 255))
        load_dataset(DataSpec(f"imagefolder:{root}", input_size=16))
        assert old in _entries(cache_root) and len(_entries(cache_root)) == 2, "kept while the other reads it"
    finally:
        reader.communicate("\n", timeout=60)
    _replace_in_place(root / "val" / "cat" / "0.bmp", (1, 2, 3))
    load_dataset(DataSpec(f"imagefolder:{root}", input_size=16))
    assert len(_entries(cache_root)) == 1, "once nobody reads them, the old entries go"

"""Export a tiny study end to end: parity of ONNX with PyTorch, the card, reloadable models, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from search.data.spec import DataSpec
from search.errors import UsageError
from search.models.build import build_model
from search.shipping.checks import check_parity
from search.shipping.export import export_trial
from search.shipping.model_file import load_pruned
from search.shipping.rebuild import load_study_baseline
from search.shipping.settings import ExportSettings
from search.study.config import SearchConfig
from search.study.front import pick_best
from search.study.run import run_search
from search.training.finetune import TrainSettings, train
from tests.conftest import ROOT, run_cli, run_main

QUICK = ExportSettings(steps=6, parity_images=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, trained_weights: Path) -> SearchConfig:
    """A finished study of the recipes (unpruned, three uniform ratios, unpruned INT8 where INT8 pays)."""
    root = tmp_path_factory.mktemp("export")
    weights = root / "baseline.pth"
    shutil.copyfile(trained_weights, weights)
    config = SearchConfig(
        budget_ms=1e6,
        weights=str(weights),
        data=DataSpec("digits", input_size=32),
        study="tiny",
        trials=5,
        finetune_steps=2,
        bn_batches=2,
        studies_dir=str(root / "studies"),
    )
    run_search(config)
    return config


def _unpruned_int8(config: SearchConfig):
    """The study and its "unpruned int8" trial, or a skip where INT8 is not searched on this machine."""
    study = _study(config)
    int8 = [t for t in study.trials if t.user_attrs.get("recipe") == "unpruned int8"]
    if not int8:
        pytest.skip(f"INT8 is not searched on this machine: {study.user_attrs.get('int8_check')}")
    return study, int8[0].number


def _study(config: SearchConfig):
    import optuna

    return optuna.load_study(study_name=config.study_name, storage=config.storage_url)


@pytest.mark.slow
def test_export_writes_checked_onnx_reloadable_models_and_a_card(tiny: SearchConfig, tmp_path: Path) -> None:
    base = load_study_baseline(_study(tiny))
    out = tmp_path / "trial-3"
    card = export_trial(base, 3, QUICK, out, command="python cli.py export --trial 3")

    for name in ("model.onnx", "model.pt", "model.torchscript.pt", "card.json", "card.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "card.json").read_text())
    assert saved == json.loads(json.dumps(card))
    for key in (
        "policy",
        "channels",
        "accuracy",
        "latency",
        "macs",
        "params",
        "files",
        "data",
        "command",
        "versions",
        "hardware",
        "onnx_check",
    ):
        assert key in saved, key
    assert saved["recipe"] == "uniform 0.5 l1" and saved["channels"]["layer4.0.conv1"] == 256
    assert saved["accuracy"]["split"] == "test"
    assert {"before_finetune", "after_finetune", "baseline", "search_brief_finetune_val"} <= set(saved["accuracy"])
    assert saved["latency"]["threads"] == 1 and 0 < saved["latency"]["median_ms"] <= saved["latency"]["p90_ms"]
    assert saved["latency"]["ratio"] < 1.0, "half the channels must time faster than the unpruned model"
    assert saved["onnx_check"]["max_abs_diff"] <= QUICK.max_abs_diff
    assert saved["onnx_check"]["top1_agreement"] >= QUICK.min_agreement
    assert "python cli.py export --trial 3" in (out / "card.md").read_text()

    # The three files give the same predictions on real images.
    x, _ = next(base.data.batches("test", 16, shuffle=False, augment=False))
    onnx_out = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        rebuilt = load_pruned(out / "model.pt")(x).numpy()
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))(x).numpy()
    np.testing.assert_allclose(rebuilt, onnx_out, atol=1e-4)
    np.testing.assert_allclose(scripted, onnx_out, atol=1e-4)

    with pytest.raises(UsageError, match="already holds an export"):
        export_trial(base, 3, QUICK, out, command="again")


def test_parity_check_fails_loudly_on_a_different_model(digits32) -> None:
    from search.measuring.onnx_export import export_onnx

    a, b = build_model("resnet18", 10).eval(), build_model("resnet18", 10).eval()
    with pytest.raises(RuntimeError, match="disagrees"):
        check_parity(
            a,
            export_onnx(b, digits32.example_input(), dynamic_batch=True),
            digits32,
            "val",
            ExportSettings(parity_images=32),
            threads=1,
        )


@pytest.mark.slow
def test_bad_export_requests_are_one_line_errors(tiny: SearchConfig, tmp_path: Path) -> None:
    study = _study(tiny)
    base = load_study_baseline(study)
    with pytest.raises(UsageError, match="has no trial 99"):
        export_trial(base, 99, QUICK, tmp_path / "x", command="")
    # A baseline that changed since the search is refused (checked by hash).
    changed = tmp_path / "changed.pth"
    model = build_model("resnet18", 10)
    train(model, base.data, TrainSettings(steps=1))
    torch.save(model.state_dict(), changed)
    with pytest.raises(UsageError, match="changed since the search"):
        load_study_baseline(study, weights=str(changed))
    with pytest.raises(UsageError, match="missing"):
        load_study_baseline(study, weights=str(tmp_path / "gone.pth"))


@pytest.mark.slow
def test_best_with_nothing_within_budget_names_the_nearest(tiny: SearchConfig) -> None:
    # A study whose only trial, the unpruned model, is over its budget of half the unpruned latency:
    # --best has nothing to export. (A search no longer ends so: what creation measured within the
    # budget runs first, so the study is made from the tiny one's unpruned trial.)
    import optuna

    source = _study(tiny)
    unpruned = next(t for t in source.trials if t.user_attrs.get("recipe") == "unpruned")
    tight = replace(tiny, study="tight")
    study = optuna.create_study(study_name="tight", storage=tight.storage_url, directions=["maximize", "minimize"])
    for key, value in source.user_attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr("budget_ms", round(unpruned.values[1] / 2, 4))
    study.add_trial(
        optuna.trial.create_trial(
            params=unpruned.params,
            distributions=unpruned.distributions,
            values=unpruned.values,
            user_attrs={**unpruned.user_attrs, "feasible": False},
        )
    )
    with pytest.raises(UsageError, match=r"no trial .* within its") as err:
        pick_best(_study(tight))
    assert "trial 0 at" in str(err.value)


def _dashboard_get(app, path: str) -> tuple[str, bytes]:
    """GET ``path`` from optuna-dashboard's WSGI app, as the browser would."""
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    answer: list[str] = []
    body = b"".join(app(environ, lambda status, headers, *_: answer.append(status)))
    return answer[0], body


def _check_the_dashboard_shows_the_card_on_the_trial(config: SearchConfig, number: int, exported: Path) -> None:
    """What optuna-dashboard shows on the trial's own page: the card it was exported with, downloadable."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    study = _study(config)
    store = FileSystemArtifactStore(str(Path(config.studies_dir) / config.study_name / "artifacts"))
    app = optuna_dashboard.wsgi(study._storage, artifact_store=store)
    status, body = _dashboard_get(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200"), status
    trial = next(t for t in json.loads(body)["trials"] if t["number"] == number)
    on_trial = {a["filename"]: a for a in trial["artifacts"]}
    assert set(on_trial) == {"card.md", "card.json"}, trial["artifacts"]
    for name, artifact in on_trial.items():
        status, content = _dashboard_get(
            app, f"/artifacts/{study._study_id}/{trial['trial_id']}/{artifact['artifact_id']}"
        )
        assert status.startswith("200") and content == (exported / name).read_bytes(), name
    study_files = {a["filename"] for a in json.loads(body)["artifacts"]}
    assert {f"trial-{number}-card.md", f"trial-{number}-card.json"} <= study_files, "the study keeps its copy too"


@pytest.mark.slow
def test_export_and_bench_through_the_cli(tiny: SearchConfig, tmp_path: Path) -> None:
    common = ["--study", "tiny", "--studies-dir", tiny.studies_dir]
    export = ["export", *common, "--trial", "2", "--epochs", "0.5", "--seed", "1", "--out", str(tmp_path / "out")]
    export += ["--test-images", "100"]
    done = run_cli(*export)  # a separate process, as a user runs it
    assert done.returncode == 0, done.stderr
    assert "Exported trial 2" in done.stdout
    card = json.loads((tmp_path / "out" / "trial-2" / "card.json").read_text())
    assert card["finetune"]["seed"] == 1 and card["finetune"]["epochs"] == 0.5
    assert card["accuracy"]["images"] == 100 and card["accuracy"]["split"] == "test", "a quick score on 100 images"
    assert "test (100 images)" in (tmp_path / "out" / "trial-2" / "card.md").read_text()
    _check_the_dashboard_shows_the_card_on_the_trial(tiny, 2, tmp_path / "out" / "trial-2")
    onnx = tmp_path / "out" / "trial-2" / "model.onnx"
    bench = run_cli("bench", str(onnx), "--threads", "1", "--format", "json", timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["median_ms"] > 0
    show = run_main("show", *common, "--trial", "2")
    assert show.returncode == 0 and "stage layer1" in show.stdout and "latency" in show.stdout
    for args, words in [
        (["export", *common, "--trial", "2", "--out", str(tmp_path / "out")], "already holds an export"),
        (["export", "--study", "nope", "--studies-dir", tiny.studies_dir, "--best"], "no study database"),
        (["show", *common, "--trial", "42"], "has no trial 42"),
        (["bench", str(tmp_path / "missing.onnx")], "does not exist"),
    ]:
        bad = run_main(*args)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.slow
def test_dashboard_serves_the_study_on_localhost(tiny: SearchConfig) -> None:
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "cli.py",
            "dashboard",
            "--study",
            "tiny",
            "--studies-dir",
            tiny.studies_dir,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert f"http://127.0.0.1:{port}/" in (proc.stdout.readline() if proc.stdout else "")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as page:
                    assert "tiny" in page.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_int8_export_writes_both_models_and_checks_their_agreement(tiny: SearchConfig, tmp_path: Path) -> None:
    study, number = _unpruned_int8(tiny)
    base = load_study_baseline(study)
    # The tiny model is trained for a few dozen steps, so its logits have small margins and
    # INT8 flips more of its argmaxes than it would on a trained model: judge it by a loose
    # bar here and check below that the bar is enforced.
    loose = replace(QUICK, min_int8_agreement=0.5)
    card = export_trial(base, number, loose, tmp_path / "int8", command="python cli.py export")
    assert card["precision"] == "int8"
    assert (tmp_path / "int8" / "model.onnx").exists() and (tmp_path / "int8" / "model.int8.onnx").exists()
    agreement = card["int8"]["top1_agreement_with_fp32"]
    assert 0.5 <= agreement <= 1.0
    assert {"top1", "fp32_top1_onnxruntime", "fp32_latency_ms", "quantization"} <= set(card["int8"])
    assert card["quantization"] == "ptq" and "| quantization | PTQ" in (tmp_path / "int8" / "card.md").read_text()
    x, _ = next(base.data.batches("test", 8, shuffle=False, augment=False))
    logits = ort.InferenceSession(str(tmp_path / "int8" / "model.int8.onnx")).run(None, {"input": x.numpy()})[0]
    assert logits.shape == (8, 10)

    # The same export (same seed, same calibration) against a bar above what it reached is refused.
    if agreement < 0.99:
        strict = replace(loose, min_int8_agreement=min(1.0, agreement + 0.05))
        with pytest.raises(RuntimeError, match="agrees with the FP32 model on only"):
            export_trial(base, number, strict, tmp_path / "strict", command="python cli.py export")


@pytest.mark.slow
def test_qat_export_ships_an_int8_model_that_predicts_what_it_trained_as(tiny: SearchConfig, tmp_path: Path) -> None:
    study, number = _unpruned_int8(tiny)
    base = load_study_baseline(study)
    settings = replace(QUICK, quantization="qat", finetune_unpruned=True, min_int8_agreement=0.5)
    card = export_trial(base, number, settings, tmp_path / "qat", command="python cli.py export --quantization qat")
    assert card["quantization"] == "qat" and card["precision"] == "int8"
    qat = card["int8"]["qat"]
    assert qat["steps"] == 2 and card["finetune"]["steps"] == QUICK.steps, "the last of the 6 steps, total unchanged"
    assert qat["agreement_with_fake_quant"] >= 0.99 and qat["images"] == card["int8"]["images"]
    assert qat["int8_top1"] == card["int8"]["top1"], "the INT8 model checked is the one measured and shipped"
    x, _ = next(base.data.batches("test", 8, shuffle=False, augment=False))
    logits = ort.InferenceSession(str(tmp_path / "qat" / "model.int8.onnx")).run(None, {"input": x.numpy()})[0]
    assert logits.shape == (8, 10)
    text = (tmp_path / "qat" / "card.md").read_text()
    assert "| quantization | QAT: the last 2 steps" in text and "fake-quantized PyTorch model on" in text

    strict = replace(settings, min_qat_agreement=1.01)  # a bar no export reaches is enforced
    with pytest.raises(RuntimeError, match="agrees with the fake-quantized PyTorch model"):
        export_trial(base, number, strict, tmp_path / "strict", command="")
    assert not (tmp_path / "strict").exists()


@pytest.mark.slow
def test_a_qat_export_killed_during_qat_resumes_from_its_last_qat_epoch(
    tiny: SearchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.training import finetune

    study, number = _unpruned_int8(tiny)
    base = load_study_baseline(study)
    per_epoch = -(-len(base.data.train) // QUICK.batch_size)
    settings = replace(  # every step with fake quantization: an epoch and two steps of QAT
        QUICK, steps=per_epoch + 2, epochs=1, qat_epochs=1, quantization="qat", finetune_unpruned=True
    )
    # The bars are the other tests' business: this tiny model's near-tied logits flip under INT8 rounding.
    settings = replace(settings, min_int8_agreement=0.5, min_qat_agreement=0.9)
    whole = export_trial(base, number, settings, tmp_path / "whole", command="")
    assert whole["int8"]["qat"]["steps"] == per_epoch + 2
    save = finetune._save_state
    saved: list[int] = []
    trained: list[float] = []

    def dies_after_the_first_epoch(path, model, optimizer, scheduler, step, seconds, *rest):
        save(path, model, optimizer, scheduler, step, seconds, *rest)
        saved.append(step)
        trained.append(seconds)
        raise KeyboardInterrupt  # killed right after QAT's first epoch was saved

    monkeypatch.setattr(finetune, "_save_state", dies_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        export_trial(base, number, settings, tmp_path / "again", command="")
    assert saved == [per_epoch] and (tmp_path / ".again.partial" / "qat-state.pt").exists()
    monkeypatch.setattr(finetune, "_save_state", save)
    steps_run: list[int] = []
    train = finetune.train

    def counting(*args, **kwargs):
        result = train(*args, **kwargs)
        steps_run.append(result.steps)
        return result

    monkeypatch.setattr("search.shipping.qat.train", counting)
    resumed = export_trial(base, number, settings, tmp_path / "again", command="")
    assert steps_run == [2], "QAT resumed after its first epoch: only its last 2 steps ran again"
    assert resumed["int8"]["qat"]["train_seconds"] >= round(trained[0], 1) > 0, "the first epoch's seconds count"
    for key in ("top1", "top1_agreement_with_fp32"):
        assert resumed["int8"][key] == whole["int8"][key], key
    assert resumed["int8"]["qat"]["agreement_with_fake_quant"] == whole["int8"]["qat"]["agreement_with_fake_quant"]
    assert resumed["accuracy"]["after_finetune"] == whole["accuracy"]["after_finetune"], "the same weights ship"
    assert not (tmp_path / "again" / "qat-state.pt").exists()


@pytest.mark.slow
def test_qat_for_a_policy_it_cannot_train_is_a_one_line_error(tiny: SearchConfig, tmp_path: Path) -> None:
    study, number = _unpruned_int8(tiny)
    fp32 = next(t.number for t in study.trials if t.user_attrs.get("precision") == "fp32")
    common = ["export", "--study", "tiny", "--studies-dir", tiny.studies_dir, "--out", str(tmp_path / "x")]
    both = ["--trial", str(number), "--trial", str(fp32)]
    for args, words in [
        (["--trial", str(fp32), "--quantization", "qat"], "--quantization ptq"),
        ([*both, "--quantization", "qat", "--finetune-unpruned"], f"trial {fp32} is an FP32 policy"),
        (["--trial", str(number), "--quantization", "qat"], "pass --finetune-unpruned"),
    ]:
        bad = run_main(*common, *args)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "x").exists(), "refused before any trial was exported"


def test_qat_refuses_what_it_cannot_ship_as_trained_in_one_line() -> None:
    from types import SimpleNamespace

    from search.shipping.qat import check_quantization
    from tests.test_uncertainty import _policy

    def study(calibration: str, runtime: str) -> SimpleNamespace:
        attrs = {"precision": "int8", "policy": _policy(0.3), "quantization": {"calibration_method": calibration}}
        hardware = {"hardware": {"runtime": runtime}}
        return SimpleNamespace(trials=[SimpleNamespace(user_attrs=attrs)], user_attrs=hardware)

    qat = ExportSettings(epochs=3, quantization="qat")
    check_quantization(study("minmax", "onnxruntime"), 0, qat)  # what QAT simulates: accepted
    check_quantization(study("minmax", "openvino"), 0, qat)  # OpenVINO compiles the same QDQ ONNX
    # QAT trains against MinMax ranges: an entropy-calibrated INT8 model would not be the model trained
    with pytest.raises(UsageError, match=r"calibrated with entropy.*pass --quantization ptq"):
        check_quantization(study("entropy", "onnxruntime"), 0, qat)
    # ExecuTorch's model.int8.pte is quantized by XNNPACK after training, whatever the ONNX model carries
    with pytest.raises(UsageError, match=r"ExecuTorch study ships model\.int8\.pte.*pass --quantization ptq"):
        check_quantization(study("minmax", "executorch"), 0, qat)
    check_quantization(study("entropy", "executorch"), 0, ExportSettings(epochs=3))  # PTQ: anything goes


@pytest.mark.slow
def test_the_card_of_an_unpruned_int8_export_names_what_ships(tiny: SearchConfig, tmp_path: Path) -> None:
    study, number = _unpruned_int8(tiny)
    settings = replace(QUICK, epochs=1, min_int8_agreement=0.5)
    export_trial(load_study_baseline(study), number, settings, tmp_path / "c", command="python cli.py export")
    text = (tmp_path / "c" / "card.md").read_text()
    title = text.splitlines()[0]
    assert "unpruned, INT8" in title and " pruned" not in title
    files = next(line for line in text.splitlines() if line.startswith("| files |"))
    assert "model.int8.onnx" in files and "`model.int8.onnx` is what ships" in files
    assert "InferenceSession('model.int8.onnx')" in text
    assert "| fine-tune | none: nothing was pruned" in text, "an unpruned policy keeps the baseline's weights"
    card = json.loads((tmp_path / "c" / "card.json").read_text())
    assert card["finetune"]["steps"] == 0 and card["accuracy"]["after_finetune"] == card["accuracy"]["before_finetune"]

    asked = replace(settings, finetune_unpruned=True)
    export_trial(load_study_baseline(study), number, asked, tmp_path / "d", command="python cli.py export")
    assert "| fine-tune | 1 epoch (" in (tmp_path / "d" / "card.md").read_text(), "unless asked"


def test_parity_is_judged_relative_to_the_logits_scale(digits32) -> None:
    """Large logits round more in absolute terms: a correct export must pass however large they are."""
    import torch

    from search.measuring.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e5)  # logits in the thousands and more, as an untempered large model gives
    onnx_model = export_onnx(model, digits32.example_input(), dynamic_batch=True)
    result = check_parity(model, onnx_model, digits32, "val", QUICK, threads=1)
    assert result["max_abs_diff"] > QUICK.max_abs_diff, "an absolute bar alone would have refused it"
    assert result["max_rel_diff"] < QUICK.max_rel_diff and result["top1_agreement"] >= 0.99


@pytest.mark.slow
def test_a_failed_check_leaves_nothing_in_the_export_folder(tiny: SearchConfig, tmp_path: Path) -> None:
    base = load_study_baseline(_study(tiny))
    impossible = replace(QUICK, max_abs_diff=0.0, max_rel_diff=0.0)  # no export can meet it
    with pytest.raises(UsageError, match=r"ONNX Runtime disagrees with PyTorch.*nothing was exported"):
        export_trial(base, 3, impossible, tmp_path / "out" / "trial-3", command="python cli.py export")
    assert not (tmp_path / "out" / "trial-3").exists(), "no model.onnx a user or bench could take for verified"
    card = export_trial(base, 3, QUICK, tmp_path / "out" / "trial-3", command="python cli.py export")
    assert card["onnx_check"]["max_rel_diff"] <= QUICK.max_rel_diff
    assert (tmp_path / "out" / "trial-3" / "model.onnx").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["trial-3"], "no partial folder left behind"


def test_the_best_epoch_on_val_is_kept_when_fine_tuning_makes_it_worse(
    digits32, trained_weights: Path, tmp_path: Path
) -> None:
    import torch

    from search.shipping.best_epoch import BestEpoch
    from search.training.evaluate import top1

    model = build_model("resnet18", 10)
    model.load_state_dict(torch.load(trained_weights, weights_only=True))
    model.eval()
    epochs = BestEpoch(tmp_path, digits32)
    epochs.consider(0, model)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn_like(model.fc.weight))  # an epoch that ruined the classifier
    epochs.consider(1, model)
    assert epochs.scores[1] < epochs.scores[0]
    assert epochs.restore(model) == 0
    assert top1(model, digits32, "val") == epochs.scores[0], "the kept weights are epoch 0's"
    resumed = BestEpoch(tmp_path, digits32)
    assert resumed.scores == epochs.scores, "a resumed export remembers the scores"
    epochs.discard()
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_export_that_dies_after_its_fine_tune_resumes_from_the_epoch_it_kept(
    tiny: SearchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.shipping import export as export_module

    base = load_study_baseline(_study(tiny))
    per_epoch = -(-len(base.data.train) // QUICK.batch_size)
    longer = replace(QUICK, steps=per_epoch + 2)  # an epoch and a bit: a checkpoint to resume from, epochs to keep
    whole = export_trial(base, 2, longer, tmp_path / "whole", command="python cli.py export")
    assert set(whole["finetune"]["val_top1_by_epoch"]) == {"0", "1", "2"}
    real = export_module._export_and_check

    tuned: dict[str, torch.Tensor] = {}

    def dies(base, model, *args, **kwargs):  # killed after the fine-tune, while exporting and checking
        tuned.update({k: v.clone() for k, v in model.state_dict().items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_export_and_check", dies)
    with pytest.raises(KeyboardInterrupt):
        export_trial(base, 2, longer, tmp_path / "again", command="python cli.py export")
    monkeypatch.setattr(export_module, "_export_and_check", real)
    (state,) = tmp_path.glob("**/finetune-state.pt")
    trained = torch.load(state, weights_only=True)["seconds"]
    (record,) = tmp_path.glob("**/best-epoch.json")
    scored = {e: round(v, 4) for e, v in json.loads(record.read_text()).items()}
    real_card = export_module.card_record

    def dies_in_the_card(*args, **kwargs):  # the last moment before the files move into place
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "card_record", dies_in_the_card)
    with pytest.raises(KeyboardInterrupt):
        export_trial(base, 2, longer, tmp_path / "again", command="python cli.py export")
    monkeypatch.setattr(export_module, "card_record", real_card)
    assert state.exists() and record.exists(), "a run killed while writing its card keeps what resumes it"
    resumed = export_trial(base, 2, longer, tmp_path / "again", command="python cli.py export")
    # Top-1 before the fine-tune is read on the recalibrated model, on a resume too (it was the baseline's
    # BatchNorm statistics there: far below what the uninterrupted run reported).
    assert resumed["accuracy"]["before_finetune"] == whole["accuracy"]["before_finetune"]
    assert resumed["finetune"]["seconds"] >= round(trained, 1) > 0, "the card counts the fine-tune before the kill"
    assert resumed["finetune"]["images_per_second"] > 0, "the rate of the runs before the resume, not 0"
    # Compared with what the killed run scored and kept (a second fine-tune with feature distillation, the
    # default, is not bit-for-bit the first: "whole" can differ from it by an image of the small val split).
    assert resumed["finetune"]["val_top1_by_epoch"] == scored, "the scores survive"
    assert str(resumed["finetune"]["kept_epoch"]) == max(sorted(scored, key=int), key=lambda e: scored[e])
    shipped = load_pruned(tmp_path / "again" / "model.pt").state_dict()
    assert all(torch.equal(shipped[k], tuned[k]) for k in tuned), "the weights the killed run kept ship"
    assert not [p.name for p in (tmp_path / "again").iterdir() if p.name.startswith(("best-epoch", "finetune-state"))]


def test_epochs_0_ships_the_pruned_model_without_a_training_step(tiny: SearchConfig, tmp_path: Path) -> None:
    untrained = replace(QUICK, steps=None, epochs=0)
    card = export_trial(load_study_baseline(_study(tiny)), 2, untrained, tmp_path / "e", command="python cli.py export")
    assert card["finetune"]["steps"] == 0 and card["finetune"]["val_top1_by_epoch"].keys() == {"0"}
    assert card["accuracy"]["after_finetune"] == card["accuracy"]["before_finetune"], "the recalibrated model ships"


@pytest.mark.slow
def test_the_card_records_the_epochs_scored_on_val_and_the_one_kept(tiny: SearchConfig, tmp_path: Path) -> None:
    card = export_trial(load_study_baseline(_study(tiny)), 2, QUICK, tmp_path / "e", command="python cli.py export")
    scores = card["finetune"]["val_top1_by_epoch"]
    assert set(scores) == {"0", "1"}, "before the fine-tune and after its one (partial) epoch"
    assert str(card["finetune"]["kept_epoch"]) == max(sorted(scores, key=int), key=lambda e: scores[e])
    assert "chosen on val" in (tmp_path / "e" / "card.md").read_text()
    assert not [p.name for p in (tmp_path / "e").iterdir() if p.name.startswith("best-epoch")]

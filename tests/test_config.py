"""Options defined once: YAML configs and presets, replay from a run's config.yaml, the package's surface."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cifar_resnet.cli import fit as cli
from cifar_resnet.cli.arguments import _base_type, config_yaml, load_config_file, presets, resolve
from cifar_resnet.config import SECTIONS, DataConfig, FitConfig, ModelConfig, TrainerConfig, field_types, specs
from cifar_resnet.errors import UserError
from tests.conftest import REPO_ROOT
from tests.helpers import fit, fit_args


def test_flags_win_over_the_config_file_which_wins_over_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("arch: resnet56\nlr: 0.05\nweight_decay: 1e-4\nmilestones: [0.3, 0.6]\nhflip: false\n")
    request = resolve(["--config", str(config), "--lr", "0.2", "--hflip"])
    c = request.config
    assert (c.model.arch, c.model.lr, c.model.weight_decay, c.model.milestones) == ("resnet56", 0.2, 1e-4, (0.3, 0.6))
    assert c.data.hflip is True, "the flag wins over the file's false"
    assert c.trainer.max_epochs == TrainerConfig().max_epochs, "neither file nor flag: the default"
    assert request.explicit == {"lr", "hflip"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("lr: -1\n", r"--lr must be a positive number, got -1 \(in --config .*bad\.yaml\)"),
        ("learning_rate: 0.1\n", r"unknown option learning_rate; see fit.py --help"),
        ("lr: [0.1\n", r"not valid YAML at line"),
        ("- lr\n", r"expected 'option: value' lines, got a list"),
        ("devices: 0\n", r"--devices must be auto, a positive count"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(content: str, message: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(UserError, match=message):
        resolve(["--config", str(bad)])


def _wrongly_typed_values() -> list[tuple[str, str]]:
    """(option, YAML value of the wrong type) for every option: a mapping for each, and a word for each option that
    is not free text."""
    cases = []
    for section in SECTIONS:
        hints = field_types(section)
        for f, spec in specs(section):
            cases.append((f.name, "{a: 1}"))
            if _base_type(hints[f.name]) is not str or spec.choices is not None:
                cases.append((f.name, "fast"))
    return cases


@pytest.mark.parametrize(("name", "value"), _wrongly_typed_values())
def test_a_config_file_value_of_the_wrong_type_is_one_line_naming_option_and_file(
    name: str, value: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{name}: {value}\n")
    with pytest.raises(UserError) as err:
        resolve(["--config", str(bad)])
    message = str(err.value)
    assert message.startswith(f"--{name} must be ") and message.endswith(f"(in --config {bad})"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-5"], "--seed must be an integer from 0 to 4294967295, got -5"),
        (["--seed", str(2**32)], f"--seed must be an integer from 0 to 4294967295, got {2**32}"),
        (["--cutout", "100"], "--cutout must be an integer from 0 to 31 (below the 32-pixel image side; 0 is off)"),
        (["--cutout", "32"], "--cutout must be an integer from 0 to 31"),
        (["--crop_padding", "100"], "--crop_padding must be an integer from 0 to 31 (below the 32-pixel image side"),
        (["--crop_padding", "-1"], "--crop_padding must be an integer from 0 to 31"),
        (
            ["--color_jitter", "0.4", "0.4", "0.4", "2"],
            "--color_jitter must be brightness, contrast and saturation of 0 or more and a hue from 0 to 0.5",
        ),
        (
            ["--color_jitter", "0.4", "-0.1", "0.4", "0.1"],
            "a hue from 0 to 0.5 (a fraction of a turn each way), got 0.4 -0.1 0.4 0.1",
        ),
        (["--color_jitter", "0.4", "0.4", "0.4", "-0.1"], "a hue from 0 to 0.5"),
        (["--label_smoothing", "1"], "--label_smoothing must be at least 0 and below 1, got 1.0"),
        (["--label_smoothing", "-0.1"], "--label_smoothing must be at least 0 and below 1, got -0.1"),
        (["--mixup", "-1"], "--mixup must be 0 or a positive number, got -1.0"),
        (["--cutmix", "inf"], "--cutmix must be 0 or a positive number, got inf"),
        (["--randaugment_magnitude", "31"], "--randaugment_magnitude must be an integer from 0 to 30, got 31"),
        (["--randaugment_num_ops", "0"], "--randaugment_num_ops must be a positive integer, got 0"),
    ],
)
def test_values_an_operation_cannot_mean_are_refused_with_the_valid_range(argv: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        resolve(argv)
    assert message in str(err.value)


def test_the_edges_of_each_augmentation_range_are_accepted() -> None:
    argv = ["--seed", str(2**32 - 1), "--cutout", "31", "--crop_padding", "31", "--color_jitter", "3", "3", "3", "0.5",
            "--label_smoothing", "0.99", "--mixup", "0", "--randaugment_magnitude", "30"]  # fmt: skip
    data = resolve(argv).config.data
    assert (data.seed, data.cutout, data.crop_padding, data.color_jitter) == (2**32 - 1, 31, 31, (3.0, 3.0, 3.0, 0.5))


def test_print_config_writes_yaml_that_resolves_to_the_same_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", "he2015", "--arch", "resnet56", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "schedule: multistep" in printed and "milestones: [0.5, 0.75]" in printed
    assert FitConfig.from_flat(yaml.safe_load(printed)) == resolve(["--config", "he2015", "--arch", "resnet56"]).config


def test_constructors_take_their_config_or_its_options_and_check_them() -> None:
    from cifar_resnet import CIFARDataModule, ImageClassifier

    module = ImageClassifier(arch="resnet20", lr=0.05, num_classes=3)
    assert module.config == ModelConfig(arch="resnet20", lr=0.05, num_classes=3)
    assert module.hparams["lr"] == 0.05 and module.hparams["milestones"] == [0.5, 0.75], "plain values"
    assert ImageClassifier(ModelConfig(arch="resnet32")).config.arch == "resnet32"
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        ImageClassifier(lr=0)
    with pytest.raises(TypeError, match=r"ImageClassifier: .*learning_rate"):
        ImageClassifier(learning_rate=0.1)
    data = CIFARDataModule("some/folder", batch_size=64)
    assert data.config == DataConfig(data_dir="some/folder", batch_size=64)
    # Checkpoints written before options were defined in one place used other names.
    assert ImageClassifier(no_bn_bias_decay=True, compile_model=False).config.bn_bias_decay is False


@pytest.mark.slow
def test_a_run_replayed_from_its_config_yaml_ends_with_bitwise_the_same_weights(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "logs"
    assert cli.main(fit_args(tiny_folder, logs, "--max_epochs", "2", "--seed", "7", "--no_test")) == 0
    first = logs / "resnet20" / "version_0"
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["data_dir"] == str(tiny_folder.resolve())
    assert (first / "config.yaml").read_text().startswith("# cifar_resnet run config; replay with:")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    monkeypatch.chdir(other_dir)  # absolute paths: the file means the same from anywhere
    assert cli.main(["--config", str(first / "config.yaml")]) == 0
    replayed = logs / "resnet20" / "version_1"
    a = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(replayed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((replayed / "config.yaml").read_text()) == saved


def test_every_preset_parses_with_a_source_and_the_headline_preset_is_the_headline_command() -> None:
    names = set(presets())
    assert {"resnet50-200", "he2015", "resnet18-cosine-200", "cpu-quick"} <= names
    for name in names:
        text = (presets()[name]).read_text()
        assert text.startswith("#"), f"{name} says what it is and where it comes from"
        resolve(["--config", name])  # every value passes its option's check
    assert resolve(["--config", "resnet50-200"]).config == resolve(["--arch", "resnet50", "--max_epochs", "200"]).config
    he = resolve(["--config", "he2015"]).config
    assert (he.model.lr, he.model.momentum, he.model.weight_decay, he.data.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (he.model.schedule, he.model.milestones, he.model.gamma) == ("multistep", (0.5, 0.75), 0.1)
    assert load_config_file("cpu-quick")["arch"] == "resnet20"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cpu-quick", "he2015", "resnet18-cosine-200", "resnet50-200"])
def test_each_preset_trains_a_few_steps_on_the_cpu(preset: str, tiny_folder: Path, tmp_path: Path) -> None:
    tiny = ["--data_dir", str(tiny_folder), "--val_size", "6", "--batch_size", "8", "--max_epochs", "1",
            "--limit_train_batches", "2", "--log_dir", str(tmp_path / "logs"), "--progress", "none",
            "--no_test"]  # fmt: skip
    request = resolve(["--config", preset, *tiny])
    result = cli.run_fit(request.config, request.explicit)
    assert result["best_val_acc"] is not None
    saved = yaml.safe_load((Path(result["run_dir"]) / "config.yaml").read_text())
    assert saved["arch"] == resolve(["--config", preset]).config.model.arch


def test_the_config_yaml_of_a_config_is_that_config() -> None:
    config = resolve(["--arch", "resnet56", "--color_jitter", "0.4", "0.4", "0.4", "0.1", "--devices", "0,1"]).config
    assert FitConfig.from_flat(yaml.safe_load(config_yaml(config))) == config


def test_old_flag_spellings_still_work() -> None:
    old = resolve(["--no-hflip", "--no-channels_last", "--no_test", "--no_bn_bias_decay"]).config
    assert not old.data.hflip and not old.model.channels_last and not old.run.test and not old.model.bn_bias_decay


# ---------------------------------------------------------------------------------------------- the package

_IMPORT_PROBE = textwrap.dedent(
    """
    import importlib, json, logging, pkgutil, sys, warnings
    import lightning, matplotlib, torch, torchmetrics, torchvision  # their own import-time settings come first

    def state():
        loggers = {name: (logger.level, len(logger.filters), len(logger.handlers))
                   for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
        return {"backend": matplotlib.get_backend(), "warnings": [repr(f) for f in warnings.filters],
                "loggers": loggers, "root": (logging.root.level, len(logging.root.handlers))}

    before = state()
    import cifar_resnet
    for module in pkgutil.walk_packages(cifar_resnet.__path__, "cifar_resnet."):
        importlib.import_module(module.name)
    after = state()
    after["loggers"] = {k: v for k, v in after["loggers"].items() if k in before["loggers"]}
    print(json.dumps({"same": before == after, "before": before, "after": after}))
    """
)


def test_importing_every_module_changes_no_global_setting(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["same"], {k: (report["before"][k], report["after"][k]) for k in report["before"]
                            if report["before"][k] != report["after"][k]}  # fmt: skip


def test_the_models_predict_and_plot_paths_do_not_import_lightning() -> None:
    probe = (
        "import sys; import cifar_resnet, cifar_resnet.models, cifar_resnet.tools.predict, cifar_resnet.cli.predict, "
        "cifar_resnet.tools.curves, cifar_resnet.cli.plot, cifar_resnet.tools.export, cifar_resnet.config; "
        "from cifar_resnet import create_model, load_model; create_model('resnet20'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_entry_points_work_after_a_non_editable_install(tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(REPO_ROOT)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import cifar_resnet; print(cifar_resnet.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.startswith(str(target)), "the installed copy, not the checkout"
    # Two commands run (each start costs seconds of imports); every other one must exist and call its module's
    # main, which the other tests run in-process.
    runs = {"cifar-fit": ["--config", "cpu-quick", "--print_config"], "cifar-results": ["--help"]}
    for script, args in runs.items():
        proc = subprocess.run([str(target / "bin" / script), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, (script, proc.stderr)
    for name in ("test", "predict", "export", "plot", "summary", "benchmark"):
        text = (target / "bin" / f"cifar-{name}").read_text()
        assert f"from cifar_resnet.cli.{name} import main" in text, text
        assert (target / "cifar_resnet" / "cli" / f"{name}.py").is_file(), "installed with the package"
    summary = subprocess.run([sys.executable, "-m", "cifar_resnet", "summary", "--arch", "resnet20"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert summary.returncode == 0 and "params: 269,722" in summary.stdout


def test_trainer_predict_gives_each_test_images_class_probabilities(tiny_folder: Path, tmp_path: Path) -> None:
    import lightning as L

    from cifar_resnet import CIFARDataModule, ImageClassifier
    from cifar_resnet.tools.evaluate import evaluate_checkpoint

    result = fit(*fit_args(tiny_folder, tmp_path / "logs", "--max_epochs", "1"))
    module = ImageClassifier.load_from_checkpoint(result["best_checkpoint"], weights_only=True)
    data = CIFARDataModule(str(tiny_folder), val_size=6, eval_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    probabilities = torch.cat(trainer.predict(module, datamodule=data))
    assert probabilities.shape == (15, 3) and torch.allclose(probabilities.sum(1), torch.ones(15))
    evaluation, _ = evaluate_checkpoint(result["best_checkpoint"], out=tmp_path / "eval")
    assert torch.equal(probabilities.argmax(1), evaluation.probs.argmax(1))

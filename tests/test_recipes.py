"""Training recipes: policies inside the batch augmentation, MixUp/CutMix in the step, EMA and SWA, presets."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from cifar_resnet.cli import fit as fit_module
from cifar_resnet.cli.arguments import resolve
from cifar_resnet.cli.fit import main as fit_main
from cifar_resnet.config import ModelConfig
from cifar_resnet.data import CIFARDataModule
from cifar_resnet.data.augment import AugmentConfig, BatchAugment
from cifar_resnet.data.policies import dominant_labels, mixed_soft_targets, smoothed_one_hot
from cifar_resnet.data.sources import CIFAR10_MEAN, CIFAR10_STD
from cifar_resnet.errors import UserError
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.reliability import TrainingInterruptedError
from cifar_resnet.training.schedule import LRSchedule
from tests.conftest import make_image_folder, real_cifar_subset
from tests.helpers import (
    FIT,
    REPO_ROOT,
    fit,
    fit_args,
    load_checkpoint,
    scalars,
    script_env,
    stop_mid_epoch_and_resume,
)

POLICIES = ("autoaugment", "randaugment", "trivialaugment")


@pytest.fixture
def real(tmp_path: Path) -> Path:
    """4 real CIFAR-10 training images per class: 30 train after a 10-image validation split."""
    return real_cifar_subset(tmp_path / "real", per_class=4, seed=3)


def _small(data: Path, logs: Path, *extra: str) -> list[str]:
    return fit_args(data, logs, "--val_size", "10", "--max_epochs", "2", "--no_test", *extra)


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("policy", POLICIES)
def test_the_policy_gives_identical_images_in_a_batch_their_own_ops(policy: str) -> None:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = image.expand(64, -1, -1, -1).contiguous()
    plain = BatchAugment(AugmentConfig(crop_padding=0, hflip=False), CIFAR10_MEAN, CIFAR10_STD)
    with_policy = BatchAugment(AugmentConfig(crop_padding=0, hflip=False, policy=policy), CIFAR10_MEAN, CIFAR10_STD)
    assert len(torch.unique(plain(batch, torch.Generator().manual_seed(1)), dim=0)) == 1
    out = with_policy(batch, torch.Generator().manual_seed(1))
    assert len(torch.unique(out, dim=0)) >= 20, "most of 64 copies come out differently"
    again = with_policy(batch, torch.Generator().manual_seed(1))
    assert torch.equal(out, again), "the per-batch generator alone decides"


def test_the_policy_runs_after_crop_and_flip_and_before_normalisation_and_cutout() -> None:
    """Same generator, same draws: crop and flip first, then the policy (uint8), then normalisation, then cutout."""
    from cifar_resnet.data.augment import cutout, random_crop_and_flip

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    config = AugmentConfig(crop_padding=4, hflip=True, policy="trivialaugment", cutout=8)
    augment = BatchAugment(config, CIFAR10_MEAN, CIFAR10_STD)
    gen = torch.Generator().manual_seed(5)
    x = random_crop_and_flip(images, 4, 0.5, gen)
    x = config.policy_augment()(x, gen)  # type: ignore[misc]
    expected = cutout(augment.norm(x), 8, gen)
    assert torch.equal(augment(images, torch.Generator().manual_seed(5)), expected)


def test_augmentation_mixing_and_the_mixed_loss_read_nothing_back_from_the_batch_device(tmp_path: Path) -> None:
    """On the meta device a tensor has no data: any read of a value, mask or data-dependent shape would raise."""
    images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.empty(16, dtype=torch.int64, device="meta")
    folder = make_image_folder(tmp_path / "d", per_class={"train": 4})
    for policy in POLICIES:
        dm = CIFARDataModule(str(folder), policy=policy, cutout=8, mixup=1.0, cutmix=1.0, cache_dir=str(tmp_path))
        for batch in range(4):  # batches draw MixUp or CutMix
            mixed, _, lam = dm.training_batch(images, labels, 0, batch=batch)
            assert mixed.device.type == "meta" and mixed.shape == images.shape and lam.shape == (16,)
    module = ImageClassifier(arch="resnet20", num_classes=10, label_smoothing=0.1)
    logits = torch.empty(16, 10, device="meta")
    loss, hard = module._training_loss(logits, labels, torch.empty(16, device="meta"))
    assert loss.shape == () and hard.shape == (16,)


def test_mixed_targets_fold_in_label_smoothing_and_accuracy_counts_the_dominant_label() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    for lam_value, dominant in ((0.7, [0, 1, 2, 3]), (0.3, [3, 0, 1, 2])):
        lam = torch.full((4,), lam_value)
        targets = mixed_soft_targets(labels, lam, 5, label_smoothing=0.1)
        own, partner = smoothed_one_hot(labels, 5, 0.1), smoothed_one_hot(labels.roll(1), 5, 0.1)
        assert torch.allclose(targets, lam_value * own + (1 - lam_value) * partner)
        assert torch.allclose(targets.sum(1), torch.ones(4))
        assert dominant_labels(labels, lam).tolist() == dominant == targets.argmax(1).tolist()


def test_the_preview_grid_shows_the_policy_and_the_mixing(tiny_folder: Path, tmp_path: Path) -> None:
    common = {"data_dir": str(tiny_folder), "val_size": 6, "batch_size": 8, "cache_dir": str(tmp_path / "cache")}
    previews = {}
    for name, options in {"plain": {}, "policy": {"policy": "autoaugment"}, "mixup": {"mixup": 1.0}}.items():
        dm = CIFARDataModule(**common, **options)
        dm.setup("fit")
        previews[name] = dm.augmented_preview(16)
    assert not torch.equal(previews["plain"], previews["policy"])
    assert not torch.equal(previews["plain"], previews["mixup"])
    assert "AutoAugment" in CIFARDataModule(**common, policy="autoaugment").augment_config.describe()


def test_a_training_batch_carries_lambda_only_when_mixing(tiny_folder: Path, tmp_path: Path) -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 3
    plain = CIFARDataModule(str(tiny_folder), cache_dir=str(tmp_path / "c")).training_batch(images, labels, 0)
    assert len(plain) == 2
    dm = CIFARDataModule(str(tiny_folder), cache_dir=str(tmp_path / "c"), mixup=1.0, cutmix=1.0)
    kinds = set()
    for batch in range(12):
        mixed, same_labels, lam = dm.training_batch(images, labels, 0, batch=batch)
        assert torch.equal(same_labels, labels) and lam.shape == (8,) and bool((lam == lam[0]).all())
        assert 0 <= float(lam[0]) <= 1
        again = dm.training_batch(images, labels, 0, batch=batch)
        assert torch.equal(again[0], mixed) and torch.equal(again[2], lam), "reproducible per batch"
        plain_images = dm.augment_batch(images, 0, batch=batch)
        kinds.add("cutmix" if bool((mixed == plain_images).any(dim=1).all(dim=0).any()) else "mixup")
    assert kinds == {"mixup", "cutmix"}, "both on: each batch takes one of them"


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [("--policy", "autoaugment"), ("--policy", "randaugment", "--randaugment_magnitude", "12"),
     ("--policy", "trivialaugment"), ("--mixup", "1.0"), ("--cutmix", "1.0"), ("--mixup", "0.2", "--cutmix", "1.0"),
     ("--ema", "0.9"), ("--swa_epochs", "1", "--swa_lr", "0.01")],
    ids=lambda o: " ".join(o),
)  # fmt: skip
def test_each_recipe_option_trains_on_real_images(options: tuple[str, ...], real: Path, tmp_path: Path) -> None:
    result = fit(*_small(real, tmp_path / "logs", "--limit_train_batches", "2", *options))
    run_dir = Path(result["run_dir"])
    series = scalars(run_dir)
    assert len(series["train/loss"]) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in series["train/loss"])
    assert all(0 <= acc <= 1 for _, acc in series["train/acc"])
    saved = (run_dir / "config.yaml").read_text()
    assert f"{options[0][2:]}: " in saved


def test_bad_recipe_values_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through the script's main (test_reliability runs the real script for other bad values).
    for args, message in [(("--mixup", "-1"), "--mixup must be 0 or a positive number"),
                          (("--ema", "1"), "--ema must be at least 0 and below 1"),
                          (("--policy", "augmix"), "argument --policy: invalid choice: 'augmix'"),
                          (("--randaugment_magnitude", "31"), "must be an integer from 0 to 30")]:  # fmt: skip
        try:
            code = fit_main([*args, "--log_dir", str(tmp_path / "logs")])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (args, code, lines)
        assert lines[0].startswith("fit.py: error: ") and message in lines[0], lines
    assert not (tmp_path / "logs").exists()


def test_ema_and_swa_together_and_swa_without_room_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="choose one"):
        fit(*_small(tiny_folder, tmp_path / "a", "--ema", "0.9", "--swa_epochs", "1"))
    with pytest.raises(UserError, match="swa_epochs 2 of 2 epochs"):
        fit(*_small(tiny_folder, tmp_path / "b", "--swa_epochs", "2"))


def test_presets_name_their_sources_and_set_the_recipes() -> None:
    strong = resolve(["--config", "resnet18-strong"]).config
    assert (strong.data.policy, strong.data.cutout, strong.model.label_smoothing, strong.model.ema) == (
        "trivialaugment", 16, 0.1, 0.999)  # fmt: skip
    assert (strong.data.batch_size, strong.model.lr, strong.trainer.max_epochs) == (512, 0.2, 200)
    mixup = resolve(["--config", "preact-resnet18-mixup"]).config
    assert (mixup.model.arch, mixup.data.mixup, mixup.model.lr, mixup.model.weight_decay) == (
        "preact_resnet18", 1.0, 0.1, 1e-4)  # fmt: skip
    assert (mixup.model.schedule, mixup.model.milestones, mixup.trainer.max_epochs) == ("multistep", (0.5, 0.75), 200)
    schedule = LRSchedule.for_run(0.1, 200 * 10, 200, name="multistep", milestones=(0.5, 0.75))
    assert schedule.milestone_steps() == (100 * 10, 150 * 10), "the LR drops after epochs 100 and 150"


# ---------------------------------------------------------------------------------------------- averaging


def test_swa_holds_its_lr_over_the_last_epochs() -> None:
    schedule = LRSchedule.for_run(0.1, 100, 10, name="cosine", swa_epochs=3, swa_lr=0.02)
    assert schedule.scheduled_steps == 70 and schedule(69) == pytest.approx(0.1 * (1 + math.cos(math.pi * 69 / 70)) / 2)
    assert [schedule(s) for s in (70, 85, 99)] == [0.02, 0.02, 0.02]
    assert "then SWA at 0.02 for 30 steps" in schedule.describe()


def _validate(weights: dict[str, torch.Tensor], hyper: dict, data: Path, tmp_path: Path) -> float:
    module = ImageClassifier(ModelConfig(**{k: v for k, v in hyper.items() if k in ModelConfig.__dataclass_fields__}))
    module.load_state_dict(weights)
    dm = CIFARDataModule(str(data), val_size=10, eval_batch_size=16, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # fmt: skip
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]


def test_ema_weights_are_the_ones_validated_checkpointed_and_tested(real: Path, tmp_path: Path) -> None:
    result = fit(*fit_args(real, tmp_path / "logs", "--val_size", "10", "--max_epochs", "2", "--ema", "0.7"))
    checkpoint = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    weights = [k for k in averaged if k.startswith("model.") and averaged[k].is_floating_point()]
    assert sum(not torch.equal(averaged[k], raw[k]) for k in weights) > len(weights) // 2, "EMA differs from raw"
    logged = dict(scalars(Path(result["run_dir"]))["val/loss"])
    epoch_loss = sorted(logged.items())[result["best_epoch"] - 1][1]
    hyper = checkpoint["hyper_parameters"]
    assert _validate(averaged, hyper, real, tmp_path) == pytest.approx(epoch_loss, rel=1e-5)
    assert _validate(raw, hyper, real, tmp_path) != pytest.approx(epoch_loss, rel=1e-3), "raw weights not validated"
    # The test after the fit loads the best checkpoint's averaged weights, not its raw ones.
    from cifar_resnet.tools.inference import load_model

    model = load_model(result["best_checkpoint"])
    state = {f"model.{k}": v for k, v in model.model.state_dict().items()} if hasattr(model, "model") else {}
    assert state and all(torch.equal(state[k], averaged[k]) for k in weights)


def test_every_swa_epoch_validates_its_own_average_and_the_last_one_is_kept(real: Path, tmp_path: Path) -> None:
    """Lightning validates an epoch before its epoch-end hooks: the average must be updated before that."""
    result = fit(*fit_args(real, tmp_path / "logs", "--val_size", "10", "--max_epochs", "3", "--swa_epochs", "2",
                           "--swa_lr", "0.01", "--no_test"))  # fmt: skip
    last = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert int(last["averaging_state"]["n_averaged"]) == 2, "the ends of epochs 2 and 3 averaged"
    logged = sorted(dict(scalars(Path(result["run_dir"]))["val/loss"]).items())
    assert len(logged) == 3 and logged[1][1] != pytest.approx(logged[2][1], rel=1e-6), "each epoch its own average"
    hyper = last["hyper_parameters"]
    assert _validate(last["state_dict"], hyper, real, tmp_path) == pytest.approx(logged[2][1], rel=1e-5)


# ---------------------------------------------------------------------------------------------- resume


def _state(path: Path) -> dict:
    checkpoint = load_checkpoint(path)
    optimizer = checkpoint["optimizer_states"][0]
    return {
        "step": checkpoint["global_step"],
        "tensors": {**checkpoint["state_dict"],
                    **{f"raw.{k}": v for k, v in checkpoint.get("current_model_state", {}).items()},
                    **{f"avg.{k}": v for k, v in checkpoint.get("averaging_state", {}).items()},
                    **{f"momentum.{i}": s["momentum_buffer"] for i, s in optimizer["state"].items()}},
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", [("--ema", "0.8"), ("--mixup", "0.5", "--cutmix", "1.0", "--policy", "autoaugment")], ids=" ".join
)
def test_a_run_killed_mid_epoch_resumes_bitwise_with_ema_and_with_mixing(
    recipe: tuple[str, ...], tmp_path: Path
) -> None:
    data = make_image_folder(tmp_path / "data", per_class={"train": 16, "test": 4})
    common = ("--max_epochs", "2", "--no_test", "--seed", "4", "--ckpt_every_n_steps", "1", *recipe)
    fit(*fit_args(data, tmp_path / "whole", *common))
    whole = tmp_path / "whole" / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"

    last, stopped_at = stop_mid_epoch_and_resume(data, tmp_path, common, signal.SIGKILL, [2, 3, 6, 7])

    a, b = _state(whole), _state(last)
    assert a["step"] == b["step"] == 10 and a["tensors"].keys() == b["tensors"].keys()
    if "--ema" in recipe:
        assert any(k.startswith("raw.") for k in a["tensors"]), "EMA checkpoints carry the raw weights too"
    different = [k for k in a["tensors"] if not torch.equal(a["tensors"][k], b["tensors"][k])]
    assert different == [], f"stopped at step {stopped_at}: {different[:3]}"


# ---------------------------------------------------------------------------------------------- stops with averaging


class SignalAt(L.Callback):
    """Raises ``signum`` in this process once, at one point of a fit: after training step ``step`` (the global step
    then), or after the first validation batch of epoch ``validation_epoch`` (not the sanity check). Placed first
    among the callbacks, so the run's own stop handling sees the signal at that same point."""

    def __init__(self, signum: int, step: int | None = None, validation_epoch: int | None = None) -> None:
        self.signum, self.step, self.validation_epoch = signum, step, validation_epoch
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            signal.raise_signal(self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.current_epoch == self.validation_epoch and not trainer.sanity_checking and idx == 0:
            self._send()


def _stopped_fit(monkeypatch: pytest.MonkeyPatch, stop: SignalAt, *args: str) -> TrainingInterruptedError:
    """A fit in this process that ``stop`` interrupts; the error it ends with."""
    build = fit_module.build_trainer

    def with_stop(*build_args: Any) -> Any:
        trainer, checkpoints = build(*build_args)
        trainer.callbacks.insert(0, stop)
        return trainer, checkpoints

    with monkeypatch.context() as patch:
        patch.setattr(fit_module, "build_trainer", with_stop)
        with pytest.raises(TrainingInterruptedError) as stopped:
            fit(*args)
    assert stop.sent and stopped.value.signum == stop.signum
    return stopped.value


def _network(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{what}: {len(different)} tensors differ, first {different[:3]}"


@pytest.fixture
def five_steps(tmp_path: Path) -> Path:
    """3 classes x 16 training images: 42 after a 6-image validation split, 5 batches of 8 an epoch."""
    return make_image_folder(tmp_path / "data", per_class={"train": 16})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_graceful_stop_mid_epoch_with_ema_resumes_bitwise_with_every_update(
    signum: int, five_steps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop checkpoint holds the stopping step's EMA update: raw weights, average and count all continue."""
    common = ("--max_epochs", "2", "--no_test", "--seed", "4", "--ema", "0.8")
    whole = Path(fit(*fit_args(five_steps, tmp_path / "whole", *common))["last_checkpoint"])
    logs = tmp_path / "stopped"
    stop = _stopped_fit(monkeypatch, SignalAt(signum, step=7), *fit_args(five_steps, logs, *common))
    assert stop.checkpoint is not None
    stopped = load_checkpoint(stop.checkpoint)
    assert stopped["global_step"] == 7 and int(stopped["averaging_state"]["n_averaged"]) == 7, "one update a step"
    fit(*fit_args(five_steps, logs, *common, "--ckpt_path", str(stop.checkpoint)))
    a, b = _state(whole), _state(stop.checkpoint)
    assert a["step"] == b["step"] == 10 and int(b["tensors"]["avg.n_averaged"]) == 10
    _assert_same(a["tensors"], b["tensors"], "raw, averaged, count and momentum")


@pytest.mark.parametrize(
    "recipe",
    [("--max_epochs", "2", "--ema", "0.8"), ("--max_epochs", "3", "--swa_epochs", "2", "--swa_lr", "0.01")],
    ids=["EMA", "SWA"],
)
def test_a_stop_during_validation_saves_raw_and_averaged_weights_in_their_places(
    recipe: tuple[str, ...], five_steps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation runs with the average swapped in; a SIGTERM or Ctrl-C then saves the raw weights as raw and the
    average as average, and the resumed run ends with the uninterrupted run's weights and average."""
    common = ("--no_test", "--seed", "4", "--eval_batch_size", "2", *recipe)
    epochs = int(recipe[1])
    whole = load_checkpoint(Path(fit(*fit_args(five_steps, tmp_path / "whole", *common))["last_checkpoint"]))
    assert not torch.equal(whole["state_dict"]["model.fc.weight"], whole["current_model_state"]["model.fc.weight"])
    for signum in (signal.SIGTERM, signal.SIGINT):
        logs = tmp_path / signal.Signals(signum).name
        in_validation = SignalAt(signum, validation_epoch=epochs - 1)
        stop = _stopped_fit(monkeypatch, in_validation, *fit_args(five_steps, logs, *common))
        assert stop.checkpoint is not None
        stopped = load_checkpoint(stop.checkpoint)
        assert stopped["global_step"] == 5 * epochs, "stopped in the last epoch's validation, its training done"
        _assert_same(_network(stopped["state_dict"]), _network(whole["state_dict"]), "averaged weights as state_dict")
        _assert_same(_network(stopped["current_model_state"]), _network(whole["current_model_state"]), "raw weights")
        assert stopped["averaging_state"]["n_averaged"] == whole["averaging_state"]["n_averaged"]
        fit(*fit_args(five_steps, logs, *common, "--ckpt_path", str(stop.checkpoint)))
        resumed = load_checkpoint(stop.checkpoint)
        _assert_same(_network(resumed["state_dict"]), _network(whole["state_dict"]), "averaged weights after resume")
        _assert_same(_network(resumed["current_model_state"]), _network(whole["current_model_state"]), "raw after")


# A sitecustomize for the real-signal test: the fit pauses in training step PAUSE_AT (counting from 1), writes
# PAUSE_MARKER, and goes on once the run's signal handler has recorded a signal (a state, not a time).
PAUSE_UNTIL_SIGNALLED = """
import os, time
from pathlib import Path

from cifar_resnet.training import module, reliability

_marker, _at = Path(os.environ["PAUSE_MARKER"]), int(os.environ["PAUSE_AT"])
_calls, _handled = [0], []
_handle, _step = reliability.StopSignals.handle, module.ImageClassifier.training_step


def handle(self, signum, frame):
    _handled.append(signum)
    return _handle(self, signum, frame)


def training_step(self, batch, batch_idx):
    _calls[0] += 1
    if _calls[0] == _at:
        _marker.write_text("here")
        deadline = time.monotonic() + 120  # only against a hang
        while not _handled and time.monotonic() < deadline:
            time.sleep(0.01)
    return _step(self, batch, batch_idx)


reliability.StopSignals.handle = handle
module.ImageClassifier.training_step = training_step
"""


@pytest.mark.slow
def test_a_real_sigterm_mid_epoch_with_ema_resumes_bitwise(five_steps: Path, tmp_path: Path) -> None:
    common = ("--max_epochs", "2", "--no_test", "--seed", "4", "--ema", "0.8")
    whole = Path(fit(*fit_args(five_steps, tmp_path / "whole", *common))["last_checkpoint"])
    hook, marker = tmp_path / "hook", tmp_path / "paused"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_UNTIL_SIGNALLED)
    env = {**script_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(hook), str(REPO_ROOT)]),
           "PAUSE_MARKER": str(marker), "PAUSE_AT": "7"}  # fmt: skip
    logs = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, FIT, *fit_args(five_steps, logs, *common)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # only against a hang
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err[-2000:]
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    stopped = load_checkpoint(last)
    assert stopped["global_step"] == 7 and int(stopped["averaging_state"]["n_averaged"]) == 7, "step 7's update kept"
    fit(*fit_args(five_steps, logs, *common, "--ckpt_path", str(last)))
    a, b = _state(whole), _state(last)
    assert a["step"] == b["step"] == 10
    _assert_same(a["tensors"], b["tensors"], "raw, averaged, count and momentum")

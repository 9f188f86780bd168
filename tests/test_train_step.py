"""The graph-ready training step: same arithmetic as an eager loop, no host syncs, LR as a closed form."""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics.classification import MulticlassAccuracy

from cifar_resnet.data import CIFARDataModule
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.schedule import LRSchedule
from cifar_resnet.training.step import (
    IMAGES,
    LOSS_TIMES_IMAGES,
    SYNCING_OPS,
    TOP1_HITS,
    TOPK_HITS,
    EagerReplayBackend,
    GraphedStep,
    TrainingTally,
)
from tests.conftest import make_image_folder
from tests.helpers import fit, fit_args, load_checkpoint


class EagerReplay(EagerReplayBackend):
    """The package's CPU stand-in for a CUDA graph, remembering every instance a fit creates."""

    instances: list[EagerReplay] = []  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        EagerReplay.instances.append(self)


@pytest.fixture
def graphs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> type[EagerReplay]:
    EagerReplay.instances = []
    monkeypatch.setattr(ImageClassifier, "graph_backend", EagerReplay)
    return EagerReplay


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes x 30 training images: 84 after a 6-image validation split, 10 batches of 8 an epoch."""
    return make_image_folder(tmp_path / "data", per_class={"train": 30})


class RecordBatches(L.Callback):
    """Keeps every training batch as the step receives it (augmented, on its device)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.lrs.append(float(pl_module._lr))  # the LR tensor the fused SGD read in this step


def _train(folder: Path, tmp_path: Path, epochs: int = 2, callbacks: list[L.Callback] | None = None,
           **module_args: Any) -> tuple[ImageClassifier, dict[str, torch.Tensor], L.Trainer]:  # fmt: skip
    dm = CIFARDataModule(str(folder), batch_size=8, val_size=6, cache_dir=str(tmp_path / "cache"), seed=1)
    torch.manual_seed(0)
    module = ImageClassifier(arch="resnet20", num_classes=3, **{"channels_last": False, **module_args})
    initial = copy.deepcopy(module.model.state_dict())
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0, callbacks=callbacks or [],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return module, initial, trainer


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("warmup_epochs", "epochs", "steps_per_epoch"), [(0, 3, 13), (1, 3, 13), (0.5, 4, 7)])
def test_the_closed_form_lr_equals_torchs_schedulers_at_every_step(
    warmup_epochs: float, epochs: int, steps_per_epoch: int
) -> None:
    total = epochs * steps_per_epoch
    schedule = LRSchedule.for_run(0.1, total, epochs, warmup_epochs)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    warmup = schedule.warmup_steps
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    reference: torch.optim.lr_scheduler.LRScheduler = cosine
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=max(1, warmup - 1))
        reference = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    for step in range(total):
        assert schedule(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        optimizer.step()
        reference.step()
    assert schedule(total) == 0.0 and schedule(total + 5) == 0.0, "past the end the LR stays at 0, never rises"


def test_multistep_divides_the_lr_at_half_and_three_quarters_like_torchs_multisteplr() -> None:
    schedule = LRSchedule.for_run(0.1, 200, 10, name="multistep", milestones=(0.5, 0.75), gamma=0.1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[100, 150], gamma=0.1)
    for step in range(200):
        assert schedule(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        optimizer.step()
        reference.step()
    assert schedule.milestone_steps() == (100, 150)


# ---------------------------------------------------------------------------------------------- tally


def test_the_tally_sums_loss_and_hits_like_torchmetrics_and_follows_a_non_finite_streak() -> None:
    tally = TrainingTally(top_k=5, max_nonfinite=2)
    torch.manual_seed(0)
    all_logits, all_labels, losses = [], [], []
    for _ in range(4):
        logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
        loss = F.cross_entropy(logits, labels)
        tally.update(loss, logits, labels)
        all_logits.append(logits)
        all_labels.append(labels)
        losses.append(float(loss))
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    sums = tally.sums
    assert sums[IMAGES] == 64
    assert float(sums[LOSS_TIMES_IMAGES] / sums[IMAGES]) == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert float(sums[TOP1_HITS] / 64) == pytest.approx(
        float(MulticlassAccuracy(10, top_k=1, average="micro")(logits, labels))
    )
    assert float(sums[TOPK_HITS] / 64) == pytest.approx(
        float(MulticlassAccuracy(10, top_k=5, average="micro")(logits, labels))
    )
    # Steps 4..: finite, nan, finite, nan, inf, nan -> the streak of 2 that trips begins at step 7.
    for value in (1.0, float("nan"), 1.0, float("nan"), float("inf"), float("nan")):
        tally.update(torch.tensor(value), torch.randn(2, 10), torch.tensor([0, 1]))
    assert int(tally.diverged_at) == 7 and int(tally.streak) == 3 and int(tally.step) == 10
    tally.reset_sums()
    assert torch.equal(tally.sums, torch.zeros(4))


# ---------------------------------------------------------------------------------------------- the step


def _eager_reference(initial: dict[str, torch.Tensor], batches: list, fused: bool) -> dict[str, torch.Tensor]:
    """A hand-written eager loop over the same batches: zero_grad, forward, backward, SGD step.

    ``fused=False`` is the step as it was before the graph-ready one: torch's per-tensor SGD with a float LR
    from CosineAnnealingLR. ``fused=True`` does the same arithmetic as the graph-ready step (one fused SGD
    kernel, LR read from a tensor): the only difference left is the Lightning and graph plumbing.
    """
    from cifar_resnet.models import create_model

    model = create_model("resnet20", num_classes=3)
    model.load_state_dict(initial)
    model.train()
    lr = torch.tensor(0.1) if fused else 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(batches))
    schedule = LRSchedule.for_run(0.1, len(batches), 2)
    for step, (images, labels) in enumerate(batches):
        if fused:
            lr.fill_(schedule(step))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if not fused:
            scheduler.step()
    return model.state_dict()


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph-stand-in"])
def test_the_step_trains_exactly_like_an_eager_loop(
    graphed: bool, folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    EagerReplay.instances = []
    if graphed:
        request.getfixturevalue("graphs_on_the_cpu")
    recorder = RecordBatches()
    module, initial, trainer = _train(folder, tmp_path, callbacks=[recorder], cuda_graphs=graphed)
    assert trainer.global_step == len(recorder.batches) == 20
    replays = sum(backend.replays for backend in EagerReplay.instances) if graphed else 0
    assert replays == (17 if graphed else 0), "3 warm-up steps, then every step a replay"
    got = module.model.state_dict()
    same_arithmetic = _eager_reference(initial, recorder.batches, fused=True)
    different = [k for k in got if not torch.equal(got[k], same_arithmetic[k])]
    assert different == [], f"{len(different)} tensors differ bitwise, first {different[:3]}"
    # Against the earlier per-tensor SGD the fused kernel rounds a few weights differently in the last bit.
    before = _eager_reference(initial, recorder.batches, fused=False)
    for key, value in before.items():
        assert torch.allclose(got[key].double(), value.double(), rtol=1e-4, atol=1e-5), key


def test_a_replayed_graph_holds_the_whole_step_and_counts_every_step(
    graphs_on_the_cpu: type[EagerReplay], folder: Path, tmp_path: Path
) -> None:
    outside: list[str] = []

    class OpsOutsideTheGraph(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            backend = graphs_on_the_cpu.instances[-1] if graphs_on_the_cpu.instances else None
            if backend is not None and backend.run is not None and not backend.replaying:
                outside.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            self.mode = OpsOutsideTheGraph()
            self.mode.__enter__()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.mode.__exit__(None, None, None)

    module, _, trainer = _train(folder, tmp_path, callbacks=[Watch()])
    backend = graphs_on_the_cpu.instances[-1]
    assert (backend.warmups, backend.replays) == (3, 17), "3 eager warm-up steps, then one capture, replayed"
    assert trainer.global_step == 20 and module.tally.step == 20
    step_ops = {"convolution", "convolution_backward", "native_batch_norm", "_fused_sgd_", "nll_loss_forward", "topk"}
    assert step_ops.isdisjoint(outside), sorted(step_ops & set(outside))
    assert "copy_" in outside and "fill_" in outside, "batch copied into the static buffers, LR tensor filled"


# ---------------------------------------------------------------------------------------------- averaging


class LightningEMA(L.Callback):
    """Lightning's EMAWeightAveraging fed the same steps: only its setup and its batch-end update (no swapping), so
    it watches the run without changing it; also keeps the raw state after the last step."""

    def __init__(self, decay: float) -> None:
        self.reference = EMAWeightAveraging(decay=decay)
        self.raw: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reference.setup(trainer, pl_module, "fit")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.reference.on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What Lightning's callback writes into a checkpoint: its average as state_dict, and its count."""
        checkpoint: dict[str, Any] = {"state_dict": {}}
        self.reference.on_save_checkpoint(trainer, pl_module, checkpoint)
        return checkpoint


class TorchSWA(L.Callback):
    """torch's AveragedModel (its equal average, buffers included) of the weights after each epoch's last step from
    epoch ``first_epoch``; also keeps the raw state after the last step."""

    def __init__(self, first_epoch: int) -> None:
        self.first_epoch = first_epoch
        self.average: AveragedModel | None = None
        self.raw: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.average = AveragedModel(pl_module.model, use_buffers=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.is_last_batch and trainer.current_epoch >= self.first_epoch:
            assert self.average is not None
            self.average.update_parameters(pl_module.model)
        self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _assert_close_averages(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], raw: dict) -> None:
    """Floating-point tensors equal within float rounding, integer buffers exactly; and the average is no copy."""
    assert ours.keys() == reference.keys()
    for key, value in ours.items():
        if value.is_floating_point():
            assert torch.allclose(value, reference[key], rtol=1e-5, atol=1e-6), key
        else:
            assert torch.equal(value, reference[key]), key
    moved = [k for k, v in ours.items() if v.is_floating_point() and not torch.allclose(v, raw[k], atol=1e-4)]
    assert len(moved) > len(ours) // 4, "the average differs from the raw weights"


@pytest.mark.filterwarnings("ignore:You're using the WeightAveraging callback with a model that overrides")
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph-stand-in"])
def test_ema_in_the_step_equals_lightnings_ema_callback(
    graphed: bool, folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if graphed:
        request.getfixturevalue("graphs_on_the_cpu")
    reference = LightningEMA(decay=0.9)
    module, _, trainer = _train(folder, tmp_path, callbacks=[reference], ema=0.9, cuda_graphs=graphed)
    assert trainer.global_step == 20
    if graphed:
        assert EagerReplay.instances[-1].replays == 17, "the update ran inside the replayed step"
    expected = reference.checkpoint(trainer, module)
    network = lambda state: {k: v for k, v in state.items() if k.startswith("model.")}  # noqa: E731
    # After training the module holds the average (for the test and exports); a save still places both.
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)
    ours = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    _assert_close_averages(ours, network(expected["state_dict"]), network(reference.raw))
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in ours.items())
    raw = network(saved["current_model_state"])
    assert raw.keys() == ours.keys() and all(torch.equal(raw[k], reference.raw[k]) for k in raw)
    assert int(saved["averaging_state"]["n_averaged"]) == int(expected["averaging_state"]["n_averaged"]) == 20


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph-stand-in"])
def test_swa_equals_torchs_equal_average_of_the_last_epochs_ends(
    graphed: bool, folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if graphed:
        request.getfixturevalue("graphs_on_the_cpu")
    reference = TorchSWA(first_epoch=1)
    module, _, trainer = _train(folder, tmp_path, epochs=3, callbacks=[reference], swa_epochs=2, swa_lr=0.01)
    assert reference.average is not None and int(reference.average.n_averaged) == 2
    expected = {f"model.{k}": v for k, v in reference.average.module.state_dict().items()}
    ours = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    _assert_close_averages(ours, expected, reference.raw)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert int(torch.load(tmp_path / "after.ckpt", weights_only=True)["averaging_state"]["n_averaged"]) == 2


class CountOps(TorchDispatchMode):
    """The name of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50"])
def test_an_average_update_is_five_multi_tensor_ops_whatever_the_network(arch: str) -> None:
    """One lerp over the floating-point tensors and four ops over the integer buffers (EMA and SWA alike), where
    torch's AveragedModel.update_parameters, which Lightning's callback calls, dispatches ops per tensor."""
    from torch.optim.swa_utils import get_ema_avg_fn

    from cifar_resnet.training.averaging import EMA, SWA

    module = ImageClassifier(arch=arch, num_classes=10)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False)
    expected = {EMA: ["_foreach_add", "_foreach_copy_", "_foreach_lerp_", "_foreach_mul", "_foreach_mul"],
                SWA: ["_foreach_add", "_foreach_copy_", "_foreach_div", "_foreach_lerp_", "_foreach_sub"]}  # fmt: skip
    for averaging in (EMA(0.9), SWA(2)):
        averaging.setup(trainer, module, "fit")
        averaging.on_fit_start(trainer, module)
        for _ in range(2):  # the first update copies, the second averages
            with CountOps() as counted:
                averaging.update_in_step()
                averaging.after_step(epoch=2, last_of_epoch=True)
        assert averaging.count == 2 and sorted(counted.ops) == expected[type(averaging)], counted.ops
    reference = AveragedModel(module.model, avg_fn=get_ema_avg_fn(0.9), use_buffers=True)
    reference.update_parameters(module.model)
    with CountOps() as counted:
        reference.update_parameters(module.model)
    tensors = len([*module.model.parameters(), *module.model.buffers()])
    assert len(counted.ops) > 2 * tensors > 5, (len(counted.ops), tensors)


# Functions that only read the CPU generator's draws (a batch's augmentation plan, MixUp's λ and box), never a
# tensor on the batch's device: on the CPU their reads look like syncs, on a GPU they touch host memory only.
# The meta-device tests (tests/test_recipes.py, tests/test_policy_augment.py) check that they hold no batch data.
_HOST_ONLY = {"draw", "_draw_autoaugment", "_op_counts", "draw_mix"}

# The reads designed into an epoch's last batch, by the project function they come from (file, function): the
# logged step loss, the divergence check, the epoch's throughput figure, the DataLoader's host-side seed draw.
_EPOCH_END_READS = {("module.py", "_log_step_scalars"), ("reliability.py", "on_train_batch_end"),
                    ("callbacks.py", "on_train_batch_end"), ("datamodule.py", "__iter__")}  # fmt: skip


class SyncRecorder(TorchDispatchMode):
    """Every syncing op, with the training batch during which it ran (all hooks, Lightning's own included), where
    it ran, and the innermost project function (file name, function) that led to it."""

    def __init__(self) -> None:
        super().__init__()
        self.batch: tuple[int, int] | None = None
        self.records: list[tuple[tuple[int, int], str, str, tuple[str, str]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if self.batch is not None and name in SYNCING_OPS:
            stack = traceback.extract_stack()[:-1]
            frames = [f for f in stack if "torch/" not in f.filename]
            if any(f.filename.endswith("policies.py") and f.name in _HOST_ONLY for f in frames):
                return func(*args, **(kwargs or {}))
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            project = [f for f in stack if "/cifar_resnet/" in f.filename]
            site = (Path(project[-1].filename).name, project[-1].name) if project else ("?", "?")
            self.records.append((self.batch, name, where, site))
        return func(*args, **(kwargs or {}))


class MarkBatches(L.Callback):
    def __init__(self, recorder: SyncRecorder) -> None:
        self.recorder = recorder

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self.recorder.batch = (trainer.current_epoch, idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.recorder.batch = None  # an epoch's last batch is watched up to its validation

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.recorder.batch = None


@pytest.mark.parametrize(
    "recipe",
    [(), ("--policy", "randaugment", "--mixup", "1", "--cutmix", "1"), ("--ema", "0.9"), ("--swa_epochs", "1")],
    ids=["plain", "policy-and-mixing", "ema", "swa"],
)
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph-stand-in"])
def test_training_steps_never_wait_for_the_device_except_to_log(
    graphed: bool, recipe: tuple[str, ...], folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """From an epoch's first batch to its validation, the only host reads are the step loss every
    log_every_n_steps and at the epoch's last step, and the divergence check at the epoch's last step; weight
    averaging (EMA every step, SWA at the epoch's last step) adds none."""
    if graphed:
        request.getfixturevalue("graphs_on_the_cpu")

    recorder = SyncRecorder()
    build = __import__("cifar_resnet.cli.fit", fromlist=["build_trainer"]).build_trainer

    def with_marks(*args: Any) -> Any:
        trainer, checkpoints = build(*args)
        trainer.callbacks.insert(0, MarkBatches(recorder))
        return trainer, checkpoints

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr("cifar_resnet.cli.fit.build_trainer", with_marks)
    args = fit_args(folder, tmp_path / "logs", "--max_epochs", "2", "--no_test", "--val_size", "6", *recipe)
    args[args.index("--log_every_n_steps") + 1] = "4"
    if not graphed:
        args.append("--no-cuda_graphs")
    with recorder:
        fit(*args)
    per_batch: dict[tuple[int, int], list[str]] = {}
    sites: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for batch, name, where, site in recorder.records:
        per_batch.setdefault(batch, []).append(f"{name} at {where}")
        sites.setdefault(batch, []).append(site)
    assert {epoch for epoch, _ in per_batch} == {0, 1}, "the recorder saw both epochs"
    for epoch in (0, 1):
        for idx in range(9):
            step = epoch * 10 + idx
            expected = 1 if (step + 1) % 4 == 0 else 0
            reads = per_batch.get((epoch, idx), [])
            assert len(reads) == expected, f"step {step}: {reads}"
        # The epoch's last batch, up to its validation: the loss is logged once, and nothing else reads but the
        # epoch's designed reads (divergence check, throughput, the loader's seed).
        last = sites.get((epoch, 9), [])
        assert last.count(("module.py", "_log_step_scalars")) == 1, per_batch.get((epoch, 9))
        assert set(last) <= _EPOCH_END_READS, per_batch.get((epoch, 9))


def test_the_lr_tensor_follows_the_replanned_schedule_after_a_resume(folder: Path, tmp_path: Path) -> None:
    from cifar_resnet.cli import fit as cli

    logs = tmp_path / "logs"
    fit(*fit_args(folder, logs, "--max_epochs", "1", "--no_test", "--val_size", "6"))
    recorder = RecordBatches()
    build = cli.build_trainer

    def recording(*args: Any) -> Any:
        trainer, checkpoints = build(*args)
        trainer.callbacks.append(recorder)
        return trainer, checkpoints

    cli.build_trainer = recording
    try:
        last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
        fit(*fit_args(folder, logs, "--max_epochs", "3", "--no_test", "--val_size", "6", "--ckpt_path", str(last)))
    finally:
        cli.build_trainer = build
    schedule = LRSchedule.for_run(0.05, 30, 3)  # fit_args' lr, 10 steps an epoch, the new length
    expected = [float(torch.tensor(schedule(step), dtype=torch.float32)) for step in range(10, 30)]
    assert recorder.lrs == expected


def test_graphed_step_refuses_a_batch_of_another_shape() -> None:
    calls: list[int] = []
    step = GraphedStep(lambda images, labels: calls.append(images.shape[0]), EagerReplay(), warmup=1)
    step(torch.zeros(4, 3, 2, 2), torch.zeros(4))
    step(torch.zeros(4, 3, 2, 2), torch.zeros(4))  # captured
    with pytest.raises(RuntimeError, match="batches of one shape"):
        step(torch.zeros(3, 3, 2, 2), torch.zeros(3))
    assert calls == [4, 4]


def test_a_checkpoint_from_automatic_optimization_resumes_at_its_step(folder: Path, tmp_path: Path) -> None:
    """Checkpoints written before the step went manual count steps in the automatic loop and have no tally."""
    from cifar_resnet.cli import fit as cli

    logs = tmp_path / "logs"
    fit(*fit_args(folder, logs, "--max_epochs", "1", "--no_test", "--val_size", "6"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    loops = checkpoint["loops"]["fit_loop"]
    manual = loops["epoch_loop.manual_optimization.optim_step_progress"]
    loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = copy.deepcopy(manual)
    for part in manual.values():
        part.update(ready=0, completed=0)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("tally.")]:
        del checkpoint["state_dict"][key]
    del checkpoint["lr_schedule_steps"], checkpoint["tally_epoch"]
    torch.save(checkpoint, last)

    recorder = RecordBatches()
    build = cli.build_trainer

    def recording(*args: Any) -> Any:
        trainer, checkpoints = build(*args)
        trainer.callbacks.append(recorder)
        return trainer, checkpoints

    cli.build_trainer = recording
    try:
        fit(*fit_args(folder, logs, "--max_epochs", "2", "--no_test", "--val_size", "6", "--ckpt_path", str(last)))
    finally:
        cli.build_trainer = build
    assert torch.load(last, weights_only=True)["global_step"] == 20
    schedule = LRSchedule.for_run(0.05, 20, 2)
    assert recorder.lrs == [float(torch.tensor(schedule(step), dtype=torch.float32)) for step in range(10, 20)]


# ---------------------------------------------------------------------------------------------- fail safe


class CaptureFails(EagerReplay):
    """A graph whose capture raises, as a driver or cuDNN error would on a user's GPU."""

    def capture(self, run: Callable[[], None]) -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class WarmupFailsBeforeItsUpdate(EagerReplay):
    """The second warm-up raises before running anything: that batch is not trained yet."""

    def warmup(self, run: Callable[[], None]) -> None:
        if self.warmups == 1:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
        super().warmup(run)


class WarmupFailsAfterItsUpdate(EagerReplay):
    """The second warm-up runs the whole step, update included, then raises: that batch is trained already."""

    def warmup(self, run: Callable[[], None]) -> None:
        super().warmup(run)
        if self.warmups == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


class ReplayFails(EagerReplay):
    """The tenth replay (step 12, in the second epoch) raises, as a faulting kernel would."""

    def replay(self) -> None:
        if self.replays == 9:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        super().replay()


def _step_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("training step:")]


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One eager fit (one epoch of 10 steps), the reference of the fallback tests: its data and its run folder."""
    root = tmp_path_factory.mktemp("eager")
    data = make_image_folder(root / "data", per_class={"train": 30})
    fit(*fit_args(data, root / "logs", "--max_epochs", "1", "--no_test", "--no_cuda_graphs"))
    return data, root / "logs" / "resnet20" / "version_0"


@pytest.mark.parametrize(
    ("backend", "failed", "at_step"),
    [(CaptureFails, "capture failed: RuntimeError: CUDA error: operation not permitted", 3),
     (WarmupFailsBeforeItsUpdate, "warm-up failed: RuntimeError: cuDNN error", 1),
     (WarmupFailsAfterItsUpdate, "warm-up failed: RuntimeError: CUDA error: an illegal memory access", 1)],
    ids=["capture", "warm-up-before-update", "warm-up-after-update"],
)  # fmt: skip
def test_a_failed_capture_falls_back_to_the_eager_step_and_trains_each_batch_once(
    backend: type[EagerReplay], failed: str, at_step: int, eager_run: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    data, eager_folder = eager_run
    monkeypatch.setattr(ImageClassifier, "graph_backend", backend)
    caplog.set_level("INFO")
    fit(*fit_args(data, tmp_path / "logs", "--max_epochs", "1", "--no_test"))
    folder = tmp_path / "logs" / "resnet20" / "version_0"
    got, want = (load_checkpoint(f / "checkpoints" / "last.ckpt") for f in (folder, eager_folder))
    assert got["global_step"] == want["global_step"] == 10
    different = [k for k in want["state_dict"] if not torch.equal(got["state_dict"][k], want["state_dict"][k])]
    assert different == [], f"{len(different)} tensors differ from the eager run, first {different[:3]}"
    lines = _step_lines(caplog)
    assert lines[0] == f"training step: {EagerReplayBackend.description}", lines
    assert len(lines) == 2 and f"CUDA graph {failed}" in lines[1] and f"at step {at_step};" in lines[1], lines
    assert "--no_cuda_graphs skips the attempt" in lines[1]
    step = json.loads((folder / "result.json").read_text())["step"]
    assert step["mode"] == "eager" and f"CUDA graph {failed}" in step["reason"], step
    eager = json.loads((eager_folder / "result.json").read_text())["step"]
    assert eager == {"mode": "eager", "reason": "--no_cuda_graphs"}


def test_the_start_line_and_the_record_name_a_graphed_step(
    graphs_on_the_cpu: type[EagerReplay], folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    fit(*fit_args(folder, tmp_path / "logs", "--max_epochs", "1", "--no_test"))
    assert _step_lines(caplog) == [f"training step: {EagerReplayBackend.description}"]
    record = json.loads((tmp_path / "logs" / "resnet20" / "version_0" / "result.json").read_text())
    assert record["step"] == {"mode": "graphed", "reason": None}
    assert graphs_on_the_cpu.instances[-1].replays == 7


def test_a_failed_replay_ends_the_fit_in_one_line_with_the_resume_command(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cifar_resnet.cli.fit import main

    EagerReplay.instances = []
    monkeypatch.setattr(ImageClassifier, "graph_backend", ReplayFails)
    args = fit_args(folder, tmp_path / "logs", "--max_epochs", "2", "--no_test")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fit.py:")]
    last = tmp_path / "logs" / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    assert lines == [
        "fit.py: error: the CUDA graph of the training step failed at step 12: RuntimeError: CUDA error: an illegal "
        "memory access was encountered; the GPU state is lost, so the run stops; resume with: python scripts/fit.py "
        f"--ckpt_path {last.resolve()} (it captures the graph again; add --no_cuda_graphs to train eagerly)"
    ]
    assert load_checkpoint(last)["global_step"] == 10, "last.ckpt is the end of the first epoch"
    # The resumed run (a new process on a GPU) warms up and captures again, and finishes.
    monkeypatch.setattr(ImageClassifier, "graph_backend", EagerReplay)
    assert main([*args, "--ckpt_path", str(last)]) == 0
    assert (EagerReplay.instances[-1].warmups, EagerReplay.instances[-1].replays) == (3, 7)
    assert load_checkpoint(last)["global_step"] == 20

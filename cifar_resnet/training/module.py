"""The LightningModule: a registry backbone, cross-entropy, fused SGD with momentum, a closed-form LR per step."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_resnet.config import ModelConfig, as_dict, upgrade_names
from cifar_resnet.data.policies import dominant_labels, mixed_soft_targets, soft_target_cross_entropy
from cifar_resnet.errors import UserError
from cifar_resnet.models import create_model
from cifar_resnet.training.averaging import WeightAverage, averaging_callback
from cifar_resnet.training.schedule import LRSchedule
from cifar_resnet.training.step import (
    IMAGES,
    LOSS_TIMES_IMAGES,
    TOP1_HITS,
    TOPK_HITS,
    CUDAGraphBackend,
    GraphBackend,
    GraphCaptureError,
    GraphedStep,
    GraphReplayError,
    TrainingTally,
)

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Precisions whose whole step can be captured: 16-mixed scales the loss through Lightning's GradScaler.
_GRAPHABLE_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true", "64-true")


class ImageClassifier(L.LightningModule):
    """Trains ``create_model(arch)`` on normalised image batches.

    Hyperparameters are plain Python values (saved in checkpoints, which therefore load with
    ``weights_only=True``). Optimisation is manual: one call does the whole step (forward, loss, backward,
    fused SGD update, on-device sums), so on a GPU it can be replayed as one CUDA graph, and nothing in it
    reads a value back to the host. The LR is a closed form of the step (:class:`LRSchedule`) written into
    a device tensor that the fused SGD kernel reads.
    """

    # How the step is captured and replayed on CUDA; the doctor and the tests substitute EagerReplayBackend.
    graph_backend: Callable[[], GraphBackend] = CUDAGraphBackend

    def __init__(self, config: ModelConfig | None = None, **options: Any) -> None:
        """``ImageClassifier(arch="resnet56", lr=0.05)`` or ``ImageClassifier(ModelConfig(...))``: every option of
        :class:`~cifar_resnet.config.ModelConfig` (defaults and checks there), given one way or the other."""
        super().__init__()
        try:
            config = dataclasses.replace(config or ModelConfig(), **upgrade_names(options))
        except TypeError as err:  # an unknown keyword
            raise TypeError(f"ImageClassifier: {err}; see cifar_resnet.config.ModelConfig") from None
        if config.ema > 0 and config.swa_epochs > 0:
            raise UserError("--ema and --swa_epochs are two kinds of weight averaging: choose one")
        self.config = config
        self.save_hyperparameters(as_dict(config))  # plain values: checkpoints load with weights_only=True
        self.automatic_optimization = False
        num_classes = config.num_classes
        self.model = create_model(config.arch, num_classes=num_classes, zero_init_residual=config.zero_init_residual)
        top_k = min(5, num_classes)
        self.tally = TrainingTally(top_k=top_k)
        for stage in ("val", "test"):
            # validate_args=False: the argument checks call torch.unique on the targets, a host sync per batch.
            accuracy = {name: MulticlassAccuracy(num_classes, top_k=k, average="micro", validate_args=False)
                        for name, k in (("acc", 1), ("acc_top5", top_k))}  # fmt: skip
            setattr(self, f"{stage}_metrics", MetricCollection(accuracy, prefix=f"{stage}/"))
            # MeanMetric's NaN check would read a flag back every batch.
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
        self.val_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.val_confusion_matrix: torch.Tensor | None = None  # the last validation's, on the CPU
        self.val_acc_best = MaxMetric()
        # Metric states are not part of state_dict by default; the best accuracy must survive a resume.
        self.val_acc_best.persistent(True)
        self.lr_schedule: LRSchedule | None = None
        self.step_metrics: dict[str, float] = {}  # the last logged step scalars, for progress displays
        self._lr: torch.Tensor | None = None
        self._graphed: GraphedStep | None = None
        # How this fit's step runs: {"mode": "graphed" | "eager", "reason": why eager (None when graphed)}.
        self.step_mode: dict[str, str | None] = {"mode": "eager", "reason": "not trained yet"}
        self._updates_issued = 0  # optimizer steps issued by _step, to tell whether a failed warm-up updated
        self._tally_epoch: int | None = None
        self._epoch_start_step = 0  # the global step at which the current epoch began
        self._planned_steps: int | None = None  # the schedule length a restored checkpoint was trained with
        self._averaging: WeightAverage | None = None  # --ema / --swa_epochs, while fitting

    def configure_model(self) -> None:
        """Speed switches that change how, not what, the network computes."""
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.config.compile and not getattr(self, "_compiled", False):
            # Compiled once per run, for training only: training batches all have one shape (the loader drops the
            # short last batch), so shapes are static. Evaluation runs eagerly (see forward): a network in eval
            # mode under inference mode is another graph (batch norm from running statistics, no autograd), so
            # compiling it would be a second compile, and a third for a short last batch; evaluating costs a few
            # percent of an epoch, too little to pay a compile for. Module.compile compiles in place, so
            # state-dict keys keep their plain names.
            self.model.compile(dynamic=False)
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch; the batch takes the weights' dtype (bf16-true, 64-true) and layout."""
        weights = next(self.model.parameters())
        if x.dtype != weights.dtype:
            x = x.to(weights.dtype)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.model.training or not getattr(self, "_compiled", False):
            return self.model(x)
        with torch.compiler.set_stance("force_eager"):  # a compiled network evaluates eagerly: see configure_model
            return self.model(x)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)

    # ------------------------------------------------------------------ training

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision inside the step itself, with autocast's weight cache off as CUDA graph capture needs
        (the cache only helps a weight used twice in one forward, which a ResNet does not do)."""
        dtype = _AUTOCAST_DTYPES.get(str(self.trainer.precision))
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    def _training_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a training batch and the hard labels its accuracy counts against.

        A mixed batch (``lam``: its λ as a device tensor) trains on soft targets, label smoothing folded in, and
        counts hits against each image's dominant label. Whether a batch is mixed is fixed for a run, so the
        branch is on the batch's structure, never on its values.
        """
        if lam is None:
            return self._loss(logits, labels), labels
        targets = mixed_soft_targets(labels, lam, logits.shape[1], self.config.label_smoothing)
        return soft_target_cross_entropy(logits, targets), dominant_labels(labels, lam)

    def _step(
        self,
        batch: tuple[torch.Tensor, ...],
        backward: Callable[[torch.Tensor], None],
        optimizer_step: Callable[[], Any],
    ) -> None:
        """One whole optimizer step on ``(images, labels)`` or ``(images, labels, lam)``. Gradients are zeroed,
        not dropped, so their storage stays in place."""
        images, labels, *mix = batch
        optimizer = self._optimizer()
        optimizer.zero_grad(set_to_none=False)
        with self._autocast():
            logits = self(images)
            loss, hard_labels = self._training_loss(logits, labels, mix[0] if mix else None)
        backward(loss)
        optimizer_step()
        self._updates_issued += 1
        if self._averaging is not None:  # EMA: in the same step (and graph) as the weights it follows
            self._averaging.update_in_step()
        self.tally.update(loss, logits, hard_labels)
        self._last_loss = loss

    def _optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.optimizers()
        return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    def _graphs_apply(self) -> tuple[bool, str]:
        """Whether this run replays its step as a CUDA graph, and why not when it does not."""
        if not self.config.cuda_graphs:
            return False, "--no_cuda_graphs"
        if self.device.type != "cuda" and self.graph_backend is CUDAGraphBackend:
            return False, f"training on {self.device.type}"
        if self.trainer.world_size > 1:
            return False, f"{self.trainer.world_size} processes (graphs are single-process here)"
        if str(self.trainer.precision) not in _GRAPHABLE_PRECISIONS:
            return False, f"--precision {self.trainer.precision}"
        return True, ""

    def _fall_back_to_eager(self, failure: GraphCaptureError) -> None:
        """The rest of this fit runs the eager step; one line says what failed and how to skip the attempt."""
        self._graphed = None
        self.step_mode = {"mode": "eager", "reason": f"{failure} (at step {self.global_step})"}
        rank_zero_info(f"training step: {failure} at step {self.global_step}; the eager step trains the rest of "
                       "the run (--no_cuda_graphs skips the attempt)")  # fmt: skip

    def _count_optimizer_step(self) -> None:
        """Count a replayed step as Lightning counts ``optimizer.step()`` under manual optimization.

        A replay runs the SGD update inside the graph, so Lightning's optimizer wrapper, which would launch it
        again, is not called; its bookkeeping (``global_step``, saved in checkpoints) is done here instead.
        """
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        step = self.global_step
        lr = self._set_lr(step)
        trained = False
        last_of_epoch = batch_idx + 1 == self.trainer.num_training_batches
        if self._graphed is not None:
            issued = self._updates_issued
            try:
                self._graphed(*batch)
                trained = True
            except GraphCaptureError as failure:
                self._fall_back_to_eager(failure)
                # A capture runs no kernel (CUDA records, the stand-in only keeps the closure): the batch is still
                # to be trained. A warm-up runs the step; only one that failed before its update has not trained
                # (if it failed after its forward, batch norm's running statistics have already seen the batch).
                trained = failure.phase == "warm-up" and self._updates_issued > issued
            except GraphReplayError as failure:
                failure.step = step
                raise
            if trained:
                self._count_optimizer_step()
        if not trained:
            lightning_optimizer = self.optimizers()
            self._step(tuple(batch), self.manual_backward, lightning_optimizer.step)
        if self._averaging is not None:  # before any batch-end hook can save: checkpoints include this update
            self._averaging.after_step(self.current_epoch, last_of_epoch)
        self._log_step_scalars(step, lr, last_of_epoch=last_of_epoch)

    def _set_lr(self, step: int) -> float:
        assert self.lr_schedule is not None and self._lr is not None
        lr = self.lr_schedule(step)
        self._lr.fill_(lr)  # a kernel argument, not a copy: no host-device sync
        return lr

    def _log_step_scalars(self, step: int, lr: float, last_of_epoch: bool) -> None:
        """Every ``log_every_n_steps`` steps and at each epoch's end: the step's loss (one read from the device)
        and LR, to the loggers."""
        if (step + 1) % max(1, self.trainer.log_every_n_steps) and not last_of_epoch:
            return
        self.step_metrics = {"train/loss_step": float(self._last_loss.detach().float()), "train/lr": lr}
        for logger in self.loggers:
            logger.log_metrics(self.step_metrics, step=step)

    def on_train_start(self) -> None:
        """Plan the LR for this run's length, point the optimizer at the LR tensor, and set up the graph.

        A run resumed with another ``--max_epochs`` gets the schedule of its new length: the remaining steps
        follow it as if the run had started with it (a closed form needs no scheduler state to rewrite).
        """
        optimizer = self._optimizer()
        self.lr_schedule = schedule = self._make_schedule()
        if self._planned_steps is not None and self._planned_steps != schedule.total_steps:
            rank_zero_info(
                f"LR schedule re-planned for --max_epochs {self.trainer.max_epochs}: {schedule.describe()} "
                f"(was {self._planned_steps:,} steps); lr at step {self.global_step} is now "
                f"{schedule(self.global_step):.4g}"
            )
        assert self._lr is not None, "configure_optimizers creates the LR tensor"
        for group in optimizer.param_groups:  # a restored optimizer holds the saved LR as a number
            group["lr"] = self._lr
        self.tally.step.fill_(self.global_step)
        if self.trainer.world_size > 1:
            self._announce_processes()
        use_graphs, reason = self._graphs_apply()
        self._graphed = None
        if use_graphs:
            backend = self.graph_backend()
            self._graphed = GraphedStep(
                lambda *batch: self._step(batch, torch.Tensor.backward, optimizer.step),
                backend,
            )
            self.step_mode = {"mode": "graphed", "reason": None}
            rank_zero_info(f"training step: {backend.description}")
        else:
            self.step_mode = {"mode": "eager", "reason": reason}
            rank_zero_info(f"training step: eager ({reason})")

    def _announce_processes(self) -> None:
        """The global batch of a multi-process run, and that the LR is used as given."""
        world, nodes = self.trainer.world_size, self.trainer.num_nodes
        layout = f"{nodes} nodes x {world // nodes} processes" if nodes > 1 else f"{world} processes"
        datamodule = self.trainer.datamodule
        batch = datamodule.config.batch_size if datamodule is not None else None
        global_batch = f"global batch {world * batch}" if batch is not None else "global batch unknown"
        rank_zero_info(
            f"{layout}: batch {batch} per process, {global_batch} per step; lr {self.config.lr:g} as given "
            "(the LR is not scaled with the number of processes)"
        )

    def on_train_end(self) -> None:
        self._graphed = None  # the graph's memory pool is freed; a later fit captures anew

    def _planned_total_steps(self) -> int:
        """The step at which this run ends: the steps taken before the current epoch, then this epoch and the rest at
        the current number of steps an epoch. A run resumed at an epoch's start with another process count (another
        global batch, so another number of steps an epoch) still ends its schedule on its last step."""
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.max_epochs is None or trainer.max_epochs < 0:
            return int(trainer.estimated_stepping_batches)
        resumed_inside_epoch = self._tally_epoch == self.current_epoch
        start = self._epoch_start_step if resumed_inside_epoch else self.global_step
        return start + (trainer.max_epochs - self.current_epoch) * int(trainer.num_training_batches)

    def _make_schedule(self) -> LRSchedule:
        hp = self.config
        try:
            return LRSchedule.for_run(
                hp.lr,
                self._planned_total_steps(),
                self.trainer.max_epochs or 1,
                hp.warmup_epochs,
                hp.schedule,
                tuple(hp.milestones),
                hp.gamma,
                hp.swa_epochs,
                hp.swa_lr,
            )
        except ValueError as err:
            raise UserError(str(err)) from None

    def configure_callbacks(self) -> list[L.Callback]:
        """The weight averaging the options ask for (``--ema``, ``--swa_epochs``), added to the trainer's."""
        if self.trainer.state.fn != TrainerFn.FITTING:  # a test after the fit reads the averaged checkpoint
            return []
        self._averaging = averaging_callback(self.config.ema, self.config.swa_epochs)
        return [self._averaging] if self._averaging is not None else []

    def on_train_epoch_start(self) -> None:
        # A mid-epoch checkpoint carries the epoch's partial sums; any other start begins from zero.
        if self._tally_epoch != self.current_epoch:
            self.tally.reset_sums()
            self._tally_epoch = self.current_epoch
            self._epoch_start_step = self.global_step

    def on_train_epoch_end(self) -> None:
        sums = self.tally.sums.clone()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        sums = sums.cpu()  # the epoch's one read of the training sums
        if sums[IMAGES] == 0:  # nothing trained in this epoch here (resumed after it): no figures to log
            return
        images = sums[IMAGES]
        self.log("train/loss", sums[LOSS_TIMES_IMAGES] / images, sync_dist=False)
        self.log("train/acc", sums[TOP1_HITS] / images, prog_bar=True, sync_dist=False)
        self.log("train/acc_top5", sums[TOPK_HITS] / images, sync_dist=False)

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        getattr(self, f"{stage}_loss")(self._loss(logits, labels), weight=labels.numel())
        getattr(self, f"{stage}_metrics").update(logits, labels)
        if stage == "val":
            self.val_confusion.update(logits, labels)

    def _log_eval(self, stage: str) -> None:
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), prog_bar=stage == "val")
        metrics = getattr(self, f"{stage}_metrics")
        self.log(f"{stage}/acc", metrics["acc"], prog_bar=stage == "val")
        self.log(f"{stage}/acc_top5", metrics["acc_top5"])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self.val_metrics["acc"].compute()
        self._log_eval("val")
        if not self.trainer.sanity_checking:  # the sanity check's few batches are no accuracy to keep
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute())
            self.val_confusion_matrix = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of a batch (images, or (images, labels)), normalised as for evaluation."""
        images = batch[0] if isinstance(batch, tuple | list) else batch
        return torch.softmax(self(images).float(), dim=1)

    # ------------------------------------------------------------------ optimisation

    def _param_groups(self) -> list[dict[str, Any]]:
        decay = self.config.weight_decay
        if self.config.bn_bias_decay:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": decay}]
        # Norm-layer weights and all biases are 1-D; decaying them only shrinks scales BN re-learns.
        with_decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        without = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": with_decay, "weight_decay": decay}, {"params": without, "weight_decay": 0.0}]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Fused SGD (one kernel for the whole update) reading its LR from a tensor on the model's device."""
        hp = self.config
        self._lr = torch.full((), hp.lr, dtype=torch.float32, device=self.device)
        optimizer = torch.optim.SGD(
            self._param_groups(),
            lr=self._lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov and hp.momentum > 0,
            fused=True,
        )
        optimizer.register_load_state_dict_post_hook(lay_out_state_like_parameters)
        return optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The LR tensor belongs to this process; the checkpoint stores the next step's LR as a number, as an
        # optimizer driven by a torch scheduler would.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "train_split", None) is not None:
            checkpoint["classes"] = list(datamodule.classes)  # what the outputs mean, for the tools
            checkpoint["normalization"] = datamodule.normalization()
        next_lr = self.lr_schedule(self.global_step) if self.lr_schedule is not None else self.config.lr
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["lr"] = next_lr
        checkpoint["lr_schedule_steps"] = self.lr_schedule.total_steps if self.lr_schedule is not None else None
        checkpoint["tally_epoch"] = self._tally_epoch
        checkpoint["epoch_start_step"] = self._epoch_start_step
        checkpoint["world_size"] = self.trainer.world_size if self._trainer is not None else 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._planned_steps = checkpoint.get("lr_schedule_steps")
        self._tally_epoch = checkpoint.get("tally_epoch")
        self._epoch_start_step = int(checkpoint.get("epoch_start_step", 0))
        _upgrade_automatic_optimization_checkpoint(checkpoint, self.tally.state_dict(prefix="tally."))


def lay_out_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (SGD's momentum buffer) its parameter's memory layout.

    ``Optimizer.load_state_dict`` keeps the layout a state tensor was saved with, while the weights take the
    layout of this run (``--channels_last`` may change on resume). The fused SGD kernel assumes the two match:
    on CUDA it refuses the step, on the CPU it silently pairs the wrong elements. torch has no option to
    re-lay restored state, so it is done here, once, after each restore.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _upgrade_automatic_optimization_checkpoint(checkpoint: dict[str, Any], tally_state: dict[str, Any]) -> None:
    """Let a checkpoint written when this module used automatic optimization resume under manual optimization.

    Its optimizer steps were counted by the automatic loop (the manual counter, which ``global_step`` now
    reads, is 0), and its state dict lacks the training tally, whose empty state is right at an epoch's start.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    manual_key = "epoch_loop.manual_optimization.optim_step_progress"
    automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loops.get(manual_key)
    if automatic and manual and manual["total"]["completed"] == 0 and automatic["total"]["completed"] > 0:
        loops[manual_key] = {part: dict(counts) for part, counts in automatic.items()}
    state = checkpoint.get("state_dict", {})
    for key, value in tally_state.items():
        state.setdefault(key, value.detach().cpu().clone())

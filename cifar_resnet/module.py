"""The LightningModule: a registry backbone, cross-entropy, SGD with momentum, cosine LR per step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_resnet.models import create_model


class ImageClassifier(L.LightningModule):
    """Trains ``create_model(arch)`` on normalised image batches.

    Hyperparameters are plain Python values (saved in checkpoints, which therefore load with
    ``weights_only=True``). The LR follows a per-step cosine over the whole run, sized from
    ``trainer.estimated_stepping_batches``, after an optional linear warm-up.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        warmup_epochs: float = 0.0,
        no_bn_bias_decay: bool = False,
        zero_init_residual: bool = False,
        channels_last: bool = False,
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(arch, num_classes=num_classes, zero_init_residual=zero_init_residual)
        top5 = min(5, num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_acc_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))
            # MeanMetric's NaN check would read a flag back every step; DivergenceStop watches the loss instead.
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
        # Read, logged and reset once per validation by eval_callbacks.ValidationReport (no per-step sync).
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.val_acc_best = MaxMetric()
        # Metric states are not part of state_dict by default; the best accuracy must survive a resume.
        self.val_acc_best.persistent(True)

    def configure_model(self) -> None:
        """Speed switches that change how, not what, the network computes."""
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile_model and not getattr(self, "_compiled", False):
            # Module.compile compiles forward in place, so state-dict keys keep their plain names.
            self.model.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        # Metrics accumulate on the device; nothing here waits for the GPU.
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), labels)
        self.train_acc_top5(logits.detach(), labels)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss, on_epoch=True)
        self.log("train/acc", self.train_acc, on_epoch=True, prog_bar=True)
        self.log("train/acc_top5", self.train_acc_top5, on_epoch=True)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        getattr(self, f"{stage}_loss")(self._loss(logits, labels), weight=labels.numel())
        getattr(self, f"{stage}_acc")(logits, labels)
        getattr(self, f"{stage}_acc_top5")(logits, labels)
        if stage == "val":
            self.val_confusion.update(logits, labels)

    def _log_eval(self, stage: str) -> None:
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), prog_bar=stage == "val")
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), prog_bar=stage == "val")
        self.log(f"{stage}/acc_top5", getattr(self, f"{stage}_acc_top5"))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self._log_eval("val")
        if not self.trainer.sanity_checking:  # the sanity check's few batches are no accuracy to keep
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ------------------------------------------------------------------ optimisation

    def _param_groups(self) -> list[dict[str, Any]]:
        decay = self.hparams.weight_decay
        if not self.hparams.no_bn_bias_decay:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": decay}]
        # Norm-layer weights and all biases are 1-D; decaying them only shrinks scales BN re-learns.
        with_decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        without = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": with_decay, "weight_decay": decay}, {"params": without, "weight_decay": 0.0}]

    def on_train_start(self) -> None:
        """Re-plan the cosine when a run resumes with another ``--max_epochs``.

        The restored scheduler keeps the length it was planned with, and a cosine followed past its end
        rises again. The remaining steps instead follow the cosine of the new length, as if the run had
        started with it: the LR moves to that curve's value at the current step and decays to 0 at the new end.
        """
        scheduler = self.lr_schedulers()
        cosine = scheduler._schedulers[-1] if isinstance(scheduler, SequentialLR) else scheduler
        if not isinstance(cosine, CosineAnnealingLR) or cosine.T_max == self._cosine_steps:
            return
        previous, cosine.T_max = cosine.T_max, self._cosine_steps
        step = max(cosine.last_epoch, 0)
        if isinstance(scheduler, SequentialLR) and scheduler.last_epoch < scheduler._milestones[0]:
            return  # still warming up: the cosine starts later with its new length
        progress = math.cos(math.pi * min(step, cosine.T_max) / cosine.T_max)
        for group, base_lr in zip(cosine.optimizer.param_groups, cosine.base_lrs, strict=True):
            group["lr"] = cosine.eta_min + (base_lr - cosine.eta_min) * (1 + progress) / 2
        cosine._last_lr = [group["lr"] for group in cosine.optimizer.param_groups]
        rank_zero_info(
            f"LR schedule re-planned for --max_epochs {self.trainer.max_epochs}: cosine over "
            f"{cosine.T_max} steps (was {previous}); lr at step {self.trainer.global_step} is now "
            f"{cosine._last_lr[0]:.4g}"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self._param_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(total_steps - 1, round(hp.warmup_epochs * steps_per_epoch))
        self._cosine_steps = total_steps - warmup_steps
        cosine = CosineAnnealingLR(optimizer, T_max=self._cosine_steps)
        if warmup_steps > 0:
            # Step s of the warm-up runs at (s + 1) / warmup_steps of the peak, reaching it on the last one.
            warmup = LinearLR(
                optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1)
            )
            scheduler: torch.optim.lr_scheduler.LRScheduler = SequentialLR(
                optimizer, [warmup, cosine], milestones=[warmup_steps]
            )
        else:
            scheduler = cosine
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "train/lr"},
        }

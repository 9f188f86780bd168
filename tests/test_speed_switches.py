"""Speed switches change how the network computes, never what it computes."""

from pathlib import Path

import lightning as L
import pytest
import torch

from cifar_resnet.data import CIFARDataModule
from cifar_resnet.training.module import ImageClassifier
from tests.helpers import fit, fit_args


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "preact_resnet20"])
def test_channels_last_gives_the_same_outputs(arch: str) -> None:
    torch.manual_seed(0)
    plain = ImageClassifier(arch=arch, channels_last=False).eval()
    fast = ImageClassifier(arch=arch, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    x = torch.randn(4, 3, 32, 32)
    first_conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = plain(x), fast(x)
    assert torch.allclose(expected, got, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = ImageClassifier(arch="resnet20", channels_last=False)
    fast = ImageClassifier(arch="resnet20", channels_last=True)
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for module in (plain, fast):
        torch.nn.functional.cross_entropy(module(x), y).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name


@pytest.mark.slow
def test_compiled_model_trains_one_step_on_the_cpu(tiny_folder: Path, tmp_path: Path) -> None:
    dm = CIFARDataModule(data_dir=str(tiny_folder), batch_size=8, val_size=6, cache_dir=str(tmp_path / "c"))
    model = ImageClassifier(arch="resnet20", num_classes=3, compile=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1
    assert hasattr(model.model, "_compiled_call_impl") and model.model._compiled_call_impl is not None
    assert set(model.state_dict()) == set(before), "compiling keeps state-dict keys unprefixed"
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.endswith("conv1.weight") for k in changed), "the step updated the weights"


def test_worker_processes_yield_the_same_tensor_batches(tiny_folder: Path, tmp_path: Path) -> None:
    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dm = CIFARDataModule(str(tiny_folder), batch_size=5, val_size=6, num_workers=workers,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
        dm.prepare_data()
        dm.setup("fit")
        return [*dm.train_dataloader(), *dm.val_dataloader()]

    in_process, from_workers = batches(0), batches(2)
    assert len(in_process) == len(from_workers) == 6 + 1  # 30 training images in batches of 5; one val batch
    for (images, labels), (w_images, w_labels) in zip(in_process, from_workers, strict=True):
        assert isinstance(w_images, torch.Tensor) and isinstance(w_labels, torch.Tensor)
        assert w_images.dtype == torch.uint8 and w_labels.dtype == torch.int64
        assert torch.equal(images, w_images) and torch.equal(labels, w_labels)


def test_precision_auto_picks_bf16_on_gpus_that_have_it_and_refuses_it_where_they_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cifar_resnet.errors import UserError
    from cifar_resnet.training.trainer import resolve_precision

    assert resolve_precision("auto", "auto") == "32-true"  # no GPU visible in tests
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert resolve_precision("auto", "gpu") == "16-mixed"
    with pytest.raises(UserError, match="this GPU has no bf16; use 16-mixed or 32-true"):
        resolve_precision("bf16-mixed", "cuda")
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # the CPU runs bf16 autocast
    with pytest.raises(UserError, match="--precision 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true"):
        resolve_precision("16-mixed", "cpu")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_every_cpu_precision_trains_and_evaluates(precision: str, tiny_folder: Path, tmp_path: Path) -> None:

    result = fit(
        *fit_args(
            tiny_folder, tmp_path / "logs", "--max_epochs", "1", "--precision", precision, "--limit_train_batches", "1"
        )
    )
    assert 0.0 <= result["best_val_acc"] <= 1.0 and 0.0 <= result["test_acc"] <= 1.0
    weights = torch.load(result["last_checkpoint"], weights_only=True)["state_dict"]["model.fc.weight"]
    assert weights.dtype == {"bf16-true": torch.bfloat16, "64-true": torch.float64}.get(precision, torch.float32)


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_a_resume_with_the_other_channels_last_relays_the_momentum_and_updates_as_plain_sgd(
    saved_channels_last: bool, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def step(module: ImageClassifier, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()

    trained = ImageClassifier(arch="resnet20", channels_last=saved_channels_last)
    trained.configure_model()
    optimizer = trained.configure_optimizers()
    step(trained, optimizer)  # momentum buffers now exist, in the saved run's layout
    torch.save({"weights": trained.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed = ImageClassifier(arch="resnet20", channels_last=not saved_channels_last)
    resumed.load_state_dict(saved["weights"])
    resumed.configure_model()
    optimizer = resumed.configure_optimizers()
    optimizer.load_state_dict(saved["optimizer"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert any(p.ndim == 4 and not p.is_contiguous() for p in params) != saved_channels_last, "the layout changed"
    for param in params:
        assert optimizer.state[param]["momentum_buffer"].stride() == param.stride()

    # The fused step must equal SGD's rule on the logical values: buf = m * buf + g + wd * w; w -= lr * buf.
    before = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    step(resumed, optimizer)
    hp = resumed.config
    for param, weight, buffer in zip(params, before, buffers, strict=True):
        expected = weight - hp.lr * (hp.momentum * buffer + param.grad + hp.weight_decay * weight)
        torch.testing.assert_close(param.detach(), expected)


@pytest.mark.slow
def test_a_run_resumed_with_the_other_channels_last_ends_as_one_resumed_with_the_same(
    tiny_folder: Path, tmp_path: Path
) -> None:
    import shutil

    first = tmp_path / "first"
    fit(*fit_args(tiny_folder, first, "--max_epochs", "1", "--no_test", "--channels_last"))
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    ends = {}
    for logs, switch in ((first, "--channels_last"), (copy, "--no_channels_last")):
        last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
        fit(*fit_args(tiny_folder, logs, "--max_epochs", "2", "--no_test", switch, "--ckpt_path", str(last)))
        ends[switch] = torch.load(last, weights_only=True)["state_dict"]
    same, other = ends["--channels_last"], ends["--no_channels_last"]
    # Only the order of float sums differs between the layouts.
    for key in same:
        torch.testing.assert_close(other[key], same[key], rtol=1e-3, atol=1e-3, msg=key)


@pytest.mark.slow
def test_compile_compiles_the_training_step_once_per_run(tiny_folder: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Validation of 6 images in batches of 4 ends with a short batch; the sanity check comes first; then two
    # epochs of training with validation between them, and the test.
    args = fit_args(tiny_folder, tmp_path / "logs", "--max_epochs", "2", "--limit_train_batches", "2", "--compile",
                    "--eval_batch_size", "4")  # fmt: skip
    with torch._dynamo.config.patch(error_on_recompile=True):  # what TORCH_LOGS=recompiles would report, as an error
        result = fit(*args)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

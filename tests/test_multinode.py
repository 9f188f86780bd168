"""Beyond one machine: a real 2-node x 2-process run on this machine with torchrun (gloo on the CPU)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_resnet.cli.arguments import resolve
from cifar_resnet.training.resume import plan_resume
from tests.conftest import real_cifar_subset
from tests.helpers import FIT, fit, fit_args, load_checkpoint, poll_checkpoint, script_env

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

# Each process of the run writes what it did: prepare_data calls per node, and the batch-norm type it trained.
NODE_TRACER = """
import os
from pathlib import Path

from cifar_resnet.data import datamodule
from cifar_resnet.training import module

_trace = Path(os.environ["NODE_TRACE"])
_env = os.environ
_where = f"node {_env.get('GROUP_RANK', '?')} local {_env.get('LOCAL_RANK', '?')} rank {_env.get('RANK', '?')}"
_prepare, _start, _end = (datamodule.CIFARDataModule.prepare_data, module.ImageClassifier.on_train_start,
                          module.ImageClassifier.on_train_end)


def _write(line):
    with open(_trace, "a") as f:
        f.write(f"{_where} {line}\\n")


def prepare_data(self):
    _write("prepare_data")
    return _prepare(self)


def on_train_start(self):
    norms = {type(m).__name__ for m in self.model.modules() if "BatchNorm" in type(m).__name__}
    _write(f"batchnorm {','.join(sorted(norms))} world {self.trainer.world_size}")
    return _start(self)


def on_train_end(self):
    _write(f"trained {self.trainer.global_step} steps")
    return _end(self)


datamodule.CIFARDataModule.prepare_data = prepare_data
module.ImageClassifier.on_train_start = on_train_start
module.ImageClassifier.on_train_end = on_train_end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nodes: int, per_node: int, script_args: list[str], env: dict, cwd: Path) -> list[subprocess.Popen]:
    """One torchrun launcher per node, as each machine of a cluster would start it."""
    port = str(_free_port())
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(per_node),
            "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
    return [subprocess.Popen([*base, "--node_rank", str(rank), FIT, *script_args], env=env, cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(nodes)]  # fmt: skip


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    return results


def test_two_nodes_of_two_processes_train_validate_like_one_and_resume_on_one(tmp_path: Path) -> None:
    import lightning as L

    from cifar_resnet import CIFARDataModule, ImageClassifier

    data = real_cifar_subset(tmp_path / "data", per_class=10, seed=0)  # 100 images: 80 train, 20 val
    logs = tmp_path / "logs"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NODE_TRACER)
    trace = tmp_path / "trace.txt"
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook), "NODE_TRACE": str(trace)}
    common = fit_args(data, logs, "--max_epochs", "1", "--no_test", "--val_size", "20", "--eval_batch_size", "4")
    multi = [*common, "--accelerator", "cpu", "--devices", "2", "--num_nodes", "2", "--strategy", "ddp",
             "--progress", "lines"]  # fmt: skip
    results = _finish(_torchrun(2, 2, multi, env, tmp_path))
    assert all(code == 0 for code, _, _ in results), [err[-6000:] for _, _, err in results]
    lines = trace.read_text().splitlines()
    prepared = sorted(line.split(" rank")[0] for line in lines if line.endswith("prepare_data"))
    assert prepared == ["node 0 local 0", "node 1 local 0"], f"prepare_data once per node: {prepared}"
    trained = [line for line in lines if "trained" in line]
    assert len(trained) == 4 and all(line.endswith("trained 2 steps") for line in trained), trained  # 80/4/8 = 2
    norms = {line.split("batchnorm ")[1] for line in lines if "batchnorm" in line}
    assert norms == {"BatchNorm2d world 4"}, "four processes, plain batch norm unless --sync_batchnorm"
    announced = "".join(out for _, out, _ in results) + "".join(err for _, _, err in results)
    assert "2 nodes x 2 processes: batch 8 per process, global batch 32 per step; lr 0.05 as given" in announced

    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    multi_acc = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if "'val/acc'" in k)
    # The same weights evaluated by one process: every validation image counted once either way.
    model = ImageClassifier.load_from_checkpoint(last, weights_only=True)
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = one.validate(model, datamodule=CIFARDataModule(str(data), val_size=20, eval_batch_size=4), verbose=False)
    assert float(single[0]["val/acc"]) == pytest.approx(float(multi_acc), abs=1e-6)

    # The 2x2 checkpoint continues on one process (80 images, 10 steps an epoch): naming part of a new process
    # layout replaces the run's whole layout, so the one process does not wait for a second node ...
    one_process = ["--ckpt_path", str(last), "--max_epochs", "2", "--devices", "1", "--strategy", "auto"]
    request = resolve([*common, *one_process])
    plan = plan_resume(request.config, request.explicit)
    assert (plan.config.trainer.devices, plan.config.trainer.num_nodes, plan.config.trainer.strategy) == (1, 1, "auto")
    assert "--num_nodes 1 (was --num_nodes 2)" in plan.notes
    fit(*common, *one_process)
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (1, 2 + 10)
    # ... and that one-process checkpoint on two nodes again (2 steps an epoch per process).
    again = [*common, "--ckpt_path", str(last), "--max_epochs", "3", "--accelerator", "cpu", "--devices", "2",
             "--num_nodes", "2", "--strategy", "ddp"]  # fmt: skip
    results = _finish(_torchrun(2, 2, again, env, tmp_path))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (2, 12 + 2)


def test_a_launcher_world_other_than_the_flags_is_one_line_and_non_zero(tiny_folder: Path, tmp_path: Path) -> None:
    args = [*fit_args(tiny_folder, tmp_path / "logs", "--max_epochs", "1"), "--accelerator", "cpu", "--devices", "1",
            "--strategy", "ddp"]  # fmt: skip
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1"}
    ((code, out, err),) = _finish(_torchrun(1, 2, args, env, tmp_path))
    assert code != 0
    ours = [line for line in (out + err).splitlines() if line.startswith("fit.py")]
    assert ours == ["fit.py: error: torchrun started 2 processes (1 node x 2), but --devices 1 --num_nodes 1 describe "
                    "another count; pass --devices 2 --num_nodes 1 (--devices counts processes per node)"]  # fmt: skip
    assert "Traceback" not in "\n".join(line for line in err.splitlines() if "fit.py" in line)
    assert not (tmp_path / "logs").exists(), "nothing written"


def test_sync_batchnorm_turns_every_bn_layer_into_syncbatchnorm_and_is_refused_on_the_cpu(tmp_path: Path) -> None:
    """torch's DDP refuses SyncBatchNorm on CPU modules, so a CPU run cannot use it; what --sync_batchnorm asks of
    Lightning is checked directly: its TorchSyncBatchNorm plugin, which converts every BN layer of the model."""
    import torch
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    from cifar_resnet import ImageClassifier
    from cifar_resnet.config import TrainerConfig
    from cifar_resnet.errors import UserError
    from cifar_resnet.training import trainer as trainer_factory

    for arch in ("resnet20", "resnet18", "preact_resnet20"):
        model = TorchSyncBatchNorm().apply(ImageClassifier(arch=arch))
        norms = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        assert norms == {torch.nn.SyncBatchNorm}, arch
    config = TrainerConfig(accelerator="cpu", sync_batchnorm=True, log_dir=str(tmp_path))
    with pytest.raises(UserError, match="--sync_batchnorm needs CUDA GPUs"):
        trainer_factory.build_trainer(config, trainer_factory.RunLabel("resnet20"))
    captured = {}
    real_trainer = trainer_factory.L.Trainer

    def recording(**kwargs):
        captured.update(kwargs)
        return real_trainer(**{**kwargs, "sync_batchnorm": False})  # this CPU cannot build the synced strategy

    trainer_factory.uses_cuda, saved = (lambda accelerator: True), trainer_factory.uses_cuda
    trainer_factory.L.Trainer = recording
    try:
        trainer_factory.build_trainer(
            TrainerConfig(accelerator="cpu", sync_batchnorm=True, precision="32-true", log_dir=str(tmp_path)),
            trainer_factory.RunLabel("resnet20"),
        )
    finally:
        trainer_factory.uses_cuda, trainer_factory.L.Trainer = saved, real_trainer
    assert captured["sync_batchnorm"] is True, "the flag reaches Lightning's Trainer"


def test_srun_task_counts_are_checked_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_resnet.errors import UserError
    from cifar_resnet.training.trainer import check_launcher_world

    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    check_launcher_world(4, 2)  # 2 nodes x 4 tasks: as srun started them
    with pytest.raises(UserError, match=r"srun started 8 processes \(2 nodes x 4\), but --devices 8 --num_nodes 1"):
        check_launcher_world(8, 1)
    for name in ("SLURM_NTASKS", "SLURM_NNODES"):
        monkeypatch.delenv(name)
    assert os.environ.get("SLURM_NTASKS") is None
    check_launcher_world(8, 1)  # no launcher: Lightning starts the processes itself
    for name in ("MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--num_nodes 2 needs the other machines' processes: start the command"):
        check_launcher_world(1, 2)  # nothing would start the second node: refused rather than waited for
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("NODE_RANK", "1")
    check_launcher_world(1, 2)  # Lightning's own multi-node set-up by environment variables


def test_sigterm_to_every_process_of_a_ddp_run_writes_one_checkpoint_and_it_resumes(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """As SLURM signals every task of a job at its time limit: all processes stop at the same step, together."""
    logs = tmp_path / "logs"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    args = [*fit_args(tiny_folder, logs, "--max_epochs", "60", "--no_test", "--ckpt_every_n_steps", "2"),
            "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]  # fmt: skip
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, FIT, *args], env=env, cwd=tmp_path, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        poll_checkpoint(last, proc, lambda c: c["global_step"] >= 2, timeout=180)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both training processes
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("fit.py: stopped by SIGTERM")]
    assert stops == [f"fit.py: stopped by SIGTERM during training, checkpoint written; resume with: python "
                     f"scripts/fit.py --ckpt_path {last}"], err[-3000:]  # fmt: skip
    saved = load_checkpoint(last)
    assert saved["global_step"] % 10 == 0, "the processes agree every 10 steps and stop together"
    # One step an epoch per process: the stop came at the last batch of epoch saved["epoch"]; one more epoch is one
    # more step.
    args[args.index("--max_epochs") + 1] = str(saved["epoch"] + 2)
    done = subprocess.run([sys.executable, FIT, *args, "--ckpt_path", str(last)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (
        saved["epoch"] + 1,
        saved["global_step"] + 1,
    )

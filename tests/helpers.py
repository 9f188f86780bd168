"""Helpers shared by the test modules: fits in-process and as scripts, checkpoint reads, waits on states.

Test modules import from here (and fixtures come from ``conftest.py``); they never import each other.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.cli.arguments import resolve
from cifar_resnet.cli.fit import run_fit
from cifar_resnet.tools.curves import read_scalars

REPO_ROOT = Path(__file__).resolve().parents[1]
FIT = str(REPO_ROOT / "scripts" / "fit.py")
TEST = str(REPO_ROOT / "scripts" / "test.py")
EXPORT = str(REPO_ROOT / "scripts" / "export.py")


def fit_args(data: Path, logs: Path, *extra: str) -> list[str]:
    """The options of a tiny resnet20 fit on ``data`` logging to ``logs``, then ``extra``."""
    return [
        "--arch", "resnet20", "--data_dir", str(data), "--log_dir", str(logs), "--val_size", "6",
        "--batch_size", "8", "--eval_batch_size", "16", "--progress", "none", "--lr", "0.05",
        "--log_every_n_steps", "1", *extra,
    ]  # fmt: skip


def fit(*argv: str) -> dict:
    """A fit in this process, as ``scripts/fit.py ARGV`` would run it (errors raise instead of exiting)."""
    request = resolve(list(argv))
    return run_fit(request.config, request.explicit)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder (all event files, resumed runs included), deduplicated by step."""
    return read_scalars(run_dir)


def script_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a script run by a test: its own decode cache, and two intra-op threads, as the in-process
    runs of conftest use (same thread count, same float sums); this checkout's package first on the path. The test
    session's mark (``SESSION_MARK``, set by conftest) is inherited, so a process a test leaves behind is found."""
    return {**os.environ, "OMP_NUM_THREADS": "2", "CIFAR_RESNET_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": with_path(str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))}  # fmt: skip


def with_path(first: str, rest: str) -> str:
    """A ``PYTHONPATH`` with ``first`` before the entries of ``rest``."""
    return os.pathsep.join(part for part in (first, rest) if part)


# The name of the environment variable that marks the processes a test session starts (conftest sets its value).
SESSION_MARK = "CIFAR_RESNET_TEST_SESSION"


def processes_marked(name: str, value: str) -> list[tuple[int, str]]:
    """Every live process (pid, command line) whose environment sets ``name`` to ``value``: the processes a test
    started, their children, and children re-parented after their parent died (Linux /proc; elsewhere none)."""
    entry = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((int(proc.name), cmdline))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return [(pid, cmdline) for pid, cmdline in found if pid != os.getpid()]


def wait_until_gone(name: str, value: str, timeout: float = 60.0) -> list[tuple[int, str]]:
    """Wait until no process is marked ``name=value``; those still there after ``timeout`` (a guard against a hang,
    not a measure of speed). A killed process is gone once it has exited (a zombie has no environment left)."""
    deadline = time.monotonic() + timeout
    while (left := processes_marked(name, value)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def end(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it: a test leaves no process behind."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# A sitecustomize that holds fit.py for good at the start of its HOLD_AT-th training step, after writing
# HOLD_MARKER: the run cannot go on, so it cannot end before the test stops it, however fast the machine is.
HOLD_HOOK = """
import os, threading
from pathlib import Path

from cifar_resnet.training import module

_marker, _at, _calls = Path(os.environ["HOLD_MARKER"]), int(os.environ["HOLD_AT"]), [0]
_training_step = module.ImageClassifier.training_step


def _holding(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == _at:
        _marker.write_text("held")
        threading.Event().wait()
    return _training_step(self, *args, **kwargs)


module.ImageClassifier.training_step = _holding
"""


def held_run_env(tmp_path: Path, at_step: int) -> tuple[dict[str, str], Path]:
    """The environment of a ``fit.py`` that holds at its ``at_step``-th training step (counted from 1 in this
    process), and the marker file it writes when it gets there."""
    hook = tmp_path / "hold_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    marker = tmp_path / "held"
    env = script_env(tmp_path)
    env.update(PYTHONPATH=with_path(str(hook), env["PYTHONPATH"]), HOLD_MARKER=str(marker), HOLD_AT=str(at_step))
    return env, marker


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists while ``proc`` runs (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def run_script(script: str, *args: str, tmp_path: Path, cwd: Path | None = None, env: dict | None = None):
    """Run ``python SCRIPT ARGS`` to its end (a timeout only guards against a hang)."""
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or tmp_path, env=env or script_env(tmp_path))  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess, prog: str = "fit.py") -> str:
    """The single ``PROG: error: ...`` line of a script that refused its input with exit status 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def files_of(folder: Path) -> list[tuple[str, int]]:
    """Every file under ``folder`` with its modification time: equal lists mean nothing was written."""
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def poll_checkpoint(
    path: Path, proc: subprocess.Popen, ready: Callable[[dict], bool], timeout: float = 120.0
) -> dict[str, Any]:
    """Load ``path`` whenever it changes until ``ready(ckpt)``; every version seen must load. The timeout only
    guards against a hang: the wait is for the state, and the run must still be going while it waits."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        if path.is_file() and (stamp := path.stat().st_mtime_ns) != seen:
            seen, ckpt = stamp, load_checkpoint(path)  # never a partial file: os.replace of an fsynced temp file
            if ready(ckpt):
                return ckpt
        time.sleep(0.01)
    raise AssertionError(f"{path} never became ready")


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same position, weights, optimizer state, LR and best record."""
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # LR included
    for idx, state in opt_a["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b["state"][idx]["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    best = [k for k in a["callbacks"] if "val/acc" in k]
    assert a["callbacks"][best[0]]["best_model_score"] == b["callbacks"][best[0]]["best_model_score"]


def training_state(path: Path) -> dict:
    """Step, weights, momentum buffers and LRs of a checkpoint."""
    checkpoint = load_checkpoint(path)
    return {
        "step": checkpoint["global_step"],
        "weights": checkpoint["state_dict"],
        "momentum": [s["momentum_buffer"] for s in checkpoint["optimizer_states"][0]["state"].values()],
        "lr": [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]],
    }


def stop_mid_epoch_and_resume(
    data: Path, tmp_path: Path, common: tuple[str, ...], signum: int, steps: list[int]
) -> tuple[Path, int]:
    """Run ``fit.py`` with ``common`` (2 epochs of 5 steps, a checkpoint every step) in ``tmp_path/stopped``, send
    ``signum`` once a checkpoint of a random step of ``steps`` is on disk, check the stop came mid-epoch, and resume
    the run to its end; the run's last.ckpt and the step it stopped at."""
    logs = tmp_path / "stopped"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    stop_at = random.Random().choice(steps)
    proc = subprocess.Popen([sys.executable, FIT, *fit_args(data, logs, *common)], env=script_env(tmp_path),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        poll_checkpoint(last, proc, lambda c: c["global_step"] >= stop_at)
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        end(proc)
    stopped_at = load_checkpoint(last)["global_step"]
    assert stopped_at < 10 and stopped_at % 5, f"stopped mid-epoch (at step {stopped_at}), not at an epoch's end"
    fit(*fit_args(data, logs, *common, "--ckpt_path", str(last)))
    return last, stopped_at

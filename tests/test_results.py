"""Run records and the results table: what fit.py writes, and mean ± std over seeds computed right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cifar_resnet.cli import results as results_cli
from cifar_resnet.config import FitConfig
from cifar_resnet.tools.results import mean_std, read_records, results_table, summarize
from tests.helpers import fit, fit_args


def _record(folder: Path, seed: int, val: float, wall: float, **options) -> Path:
    flat = {**FitConfig().flat(), "arch": "resnet20", "max_epochs": 182, "seed": seed, **options}
    command = f"python scripts/fit.py --config he2015 --seed {seed}"
    record = {"arch": flat["arch"], "seed": seed, "epochs": flat["max_epochs"], "best_val_acc": val, "best_epoch": 180,
              "test_acc": None, "wall_time_s": wall, "device": "NVIDIA H100 80GB HBM3", "options": flat,
              "command": command, "data": {"fingerprint": "abc"}}  # fmt: skip
    path = folder / f"run{seed}-{val}" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


def test_runs_that_differ_only_by_seed_make_one_row_with_mean_sample_std_and_n(tmp_path: Path, capsys) -> None:
    for seed, val, wall in ((0, 0.90, 600.0), (1, 0.92, 660.0), (2, 0.94, 540.0)):
        _record(tmp_path, seed, val, wall)
    _record(tmp_path, 3, 0.95, 600.0, devices=4, strategy="ddp")  # how it ran does not split a row ...
    _record(tmp_path, 0, 0.80, 100.0, lr=0.2)  # ... what it learned does
    rows = summarize(read_records([tmp_path]))
    rows = {row.recipe: row for row in rows}
    assert {recipe: row.n for recipe, row in rows.items()} == {"defaults": 4, "--lr 0.2": 1}
    mean, std = mean_std(rows["defaults"].val)
    values = [0.90, 0.92, 0.94, 0.95]
    assert mean == pytest.approx(sum(values) / 4)
    assert std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 3))  # sample std, n - 1
    assert rows["defaults"].seeds == [0, 1, 2, 3] and rows["defaults"].command.endswith("--seed 0")
    assert mean_std([0.8]) == (0.8, None)

    table = results_table(list(rows.values()))
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in table and "10.0 ± 0.8" in table  # minutes: 600, 660, 540, 600 s
    assert results_cli.main([str(tmp_path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("| ---") and "`python scripts/fit.py --config he2015 --seed 0`" in out
    rules = out.splitlines()[1].strip("|").split("|")
    assert all("-" in cell for cell in rules), f"every Markdown rule cell needs a '-': {rules}"  # the n column too


def test_a_run_repeated_with_the_same_seed_options_and_data_counts_once_and_is_named(tmp_path: Path, capsys) -> None:
    original = _record(tmp_path, 0, 0.175, 600.0)
    copied = tmp_path / "copy" / "result.json"  # a copied run folder
    copied.parent.mkdir()
    copied.write_text(original.read_text())
    replayed = _record(tmp_path, 0, 0.176, 610.0)  # the same seed run again (GPU arithmetic may differ a little)
    _record(tmp_path, 1, 0.20, 600.0)
    _record(tmp_path / "other_data", 0, 0.30, 600.0)  # another data fingerprint: a sample of another row
    other = json.loads((tmp_path / "other_data" / "run0-0.3" / "result.json").read_text())
    other["data"]["fingerprint"] = "def"
    (tmp_path / "other_data" / "run0-0.3" / "result.json").write_text(json.dumps(other))

    rows = summarize(read_records([tmp_path]))
    assert sorted((row.n, tuple(row.seeds)) for row in rows) == [(1, (0,)), (2, (0, 1))]
    (row,) = [row for row in rows if row.n == 2]
    assert row.val == [0.175, 0.20], "the first of the repeated runs in path order stands for them"

    assert results_cli.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    folders = ", ".join(str(p.parent) for p in sorted([copied, original, replayed], key=str))
    assert err == [f"results.py: warning: counted once: 3 runs with seed 0 and the same options and data ({folders}); "
                   "a replayed or copied run is not another sample"]  # fmt: skip


def test_results_script_says_what_is_wrong_in_one_line(tmp_path: Path, capsys) -> None:
    assert results_cli.main([str(tmp_path / "missing")]) == 2
    assert results_cli.main([str(tmp_path)]) == 2
    (tmp_path / "result.json").write_text("{not json")
    assert results_cli.main([str(tmp_path)]) == 2
    (tmp_path / "result.json").write_text(json.dumps({"best_val_acc": "abc", "options": {}}))
    assert results_cli.main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["results.py"] * 4
    assert "no such file" in lines[0] and "no finished run" in lines[1] and "not a result record" in lines[2]
    assert "best_val_acc is 'abc', not a number" in lines[3]


@pytest.mark.slow
def test_a_fit_writes_its_record_and_a_resumed_run_adds_to_its_wall_time(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    first = fit(*fit_args(tiny_folder, logs, "--max_epochs", "1", "--seed", "3"))
    record_path = Path(first["record"])
    assert record_path == logs / "resnet20" / "version_0" / "result.json"
    record = json.loads(record_path.read_text())
    assert (record["arch"], record["seed"], record["epochs"]) == ("resnet20", 3, 1)
    assert record["best_val_acc"] == pytest.approx(first["best_val_acc"]) and record["best_epoch"] == 1
    assert record["test_acc"] == pytest.approx(first["test_acc"])  # tiny_folder has a test split
    assert record["wall_time_s"] > 0 and record["versions"]["torch"] and record["options"]["lr"] == 0.05
    assert record["data"]["classes"] == 3 and record["data"]["fingerprint"]

    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    kept = torch.load(last, weights_only=True)["callbacks"]["RunClock"]["seconds"]  # the time up to that save
    assert 0 < kept <= record["wall_time_s"] + 0.05
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "2", "--seed", "3"), "--ckpt_path", str(last))
    resumed = json.loads(record_path.read_text())
    assert resumed["epochs"] == 2 and resumed["wall_time_s"] > round(kept, 1), "the second fit adds its time"
    assert torch.load(last, weights_only=True)["callbacks"]["RunClock"]["seconds"] > kept
    (row,) = summarize(read_records([logs]))
    assert (row.n, row.epochs, row.seeds) == (1, 2, [3])

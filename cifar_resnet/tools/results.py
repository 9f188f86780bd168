"""Results tables from run records: runs that differ only in their seed make one row, mean ± std over seeds.

Rows group records by architecture, epochs, data (its fingerprint) and every option that changes what is
learned ("fixed" on resume) except the seed; options that only change how a run executes (devices, logging,
speed switches) do not split rows.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_resnet.config import FitConfig, option_spec
from cifar_resnet.errors import UserError
from cifar_resnet.tables import format_table
from cifar_resnet.training.records import RECORD_NAME

# Options that say where things are rather than what is learned.
_NOT_RECIPE = {"seed", "data_dir", "cache_dir"}


def read_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``paths`` (folders searched recursively, or record files themselves)."""
    records = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        files = [path] if path.is_file() else sorted(path.rglob(RECORD_NAME))
        for file in files:
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"{file}: not a result record ({err})") from None
            valid = isinstance(record, dict) and "best_val_acc" in record and isinstance(record.get("options"), dict)
            if not valid:
                raise UserError(f"{file}: not a result record of fit.py")
            for key in ("best_val_acc", "test_acc", "wall_time_s", "epochs", "seed"):
                value = record.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise UserError(f"{file}: not a result record of fit.py ({key} is {value!r}, not a number)")
            record["path"] = str(file)
            records.append(record)
    return records


def recipe_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide what a run learns, except its seed."""
    recipe = {}
    for name, value in options.items():
        if name in _NOT_RECIPE:
            continue
        try:
            fixed = option_spec(name).on_resume == "fixed"
        except KeyError:  # an option this version no longer has: keep it, it may matter
            fixed = True
        if fixed or name == "max_epochs":
            recipe[name] = value
    return recipe


def _recipe_text(recipe: dict[str, Any]) -> str:
    """The options that differ from the defaults, as flags (the architecture and epochs have columns)."""
    defaults = FitConfig().flat()
    parts = []
    for name, value in sorted(recipe.items()):
        if name in ("arch", "max_epochs") or defaults.get(name) == value:
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no_{name}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"--{name} {' '.join(map(str, value))}")
        else:
            parts.append(f"--{name} {value}")
    return " ".join(parts) or "defaults"


@dataclass
class ResultRow:
    """One recipe: its runs' accuracies and times."""

    arch: str
    epochs: int
    recipe: str
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    command: str = ""

    @property
    def n(self) -> int:
        return len(self.val)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1); no std for a single value."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _recipe_key(record: dict[str, Any]) -> str:
    """What a row groups by: the recipe and the data's fingerprint."""
    recipe = recipe_options(record["options"])
    return json.dumps([recipe, record.get("data", {}).get("fingerprint")], sort_keys=True, default=str)


def deduplicate(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[Any, list[str]]]]:
    """The records with one run per (recipe, data, seed), and the seed and folders of each group that repeats one.

    A run replayed with the same seed, or a run folder copied, is not an independent sample: counting it twice
    would shrink the standard deviation toward 0. The first record in path order stands for its group.
    """
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: str(r.get("path", ""))):
        groups.setdefault((_recipe_key(record), record.get("seed")), []).append(record)
    kept = [group[0] for group in groups.values()]
    repeats = [
        (seed, [str(Path(r.get("path", "?")).parent) for r in group])
        for (_, seed), group in groups.items()
        if len(group) > 1
    ]
    return kept, repeats


def repeat_warning(seed: Any, folders: Sequence[str]) -> str:
    """One line about a group of runs that share their seed, recipe and data."""
    return (
        f"counted once: {len(folders)} runs with seed {seed} and the same options and data ({', '.join(folders)}); "
        "a replayed or copied run is not another sample"
    )


def summarize(records: Iterable[dict[str, Any]]) -> list[ResultRow]:
    """Rows of runs that differ only by seed, ordered by architecture, epochs and recipe; a run repeated with the
    same seed, options and data counts once (:func:`deduplicate`)."""
    rows: dict[str, ResultRow] = {}
    for record in deduplicate(records)[0]:
        if record.get("best_val_acc") is None:
            continue
        recipe = recipe_options(record["options"])
        key = _recipe_key(record)
        row = rows.setdefault(key, ResultRow(str(record["arch"]), int(record["epochs"]), _recipe_text(recipe)))
        row.val.append(float(record["best_val_acc"]))
        if record.get("test_acc") is not None:
            row.test.append(float(record["test_acc"]))
        wall = record.get("wall_time_s")
        row.wall_s.append(float(wall) if wall is not None else math.nan)
        row.seeds.append(int(record.get("seed", 0)))
        row.devices.add(str(record.get("device", "?")))
        if not row.command or record.get("seed") == min(row.seeds):
            row.command = str(record.get("command", ""))
    return sorted(rows.values(), key=lambda row: (row.arch, row.epochs, row.recipe))


def _percent(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _minutes(seconds: Sequence[float]) -> str:
    mean, std = mean_std(seconds)
    return f"{mean / 60:.1f} ± {std / 60:.1f}" if std is not None else f"{mean / 60:.1f}"


def results_table(rows: Sequence[ResultRow], markdown: bool = False) -> str:
    """Val (and test) accuracy in % as mean ± std with n, wall time per run in minutes, device, command."""
    header = ["arch", "epochs", "recipe", "n", "val top-1 %", "test top-1 %", "minutes per run", "device",
              "seeds", "command (first seed)"]  # fmt: skip
    body = [
        [
            row.arch,
            row.epochs,
            row.recipe,
            row.n,
            _percent(row.val),
            _percent(row.test),
            _minutes(row.wall_s),
            ", ".join(sorted(row.devices)),
            ",".join(map(str, sorted(row.seeds))),
            f"`{row.command}`" if markdown else row.command,
        ]
        for row in rows
    ]
    return format_table(header, body, markdown=markdown)

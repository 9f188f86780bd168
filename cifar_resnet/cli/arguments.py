"""``scripts/fit.py``'s flags and YAML configs, both derived from :mod:`cifar_resnet.config`.

Values come from three places, later ones winning: the options' defaults, a ``--config`` file (a preset's
name or a YAML path, its keys the flag names), and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cifar_resnet.cli.common import OneLineErrorParser
from cifar_resnet.config import SECTIONS, FitConfig, OptionError, Spec, field_types, specs
from cifar_resnet.errors import UserError

GROUP_TITLES = {
    "model": "model",
    "optimisation": "optimisation",
    "data": "data",
    "augmentation": "augmentation (training batches, on the device that trains)",
    "trainer": "trainer",
    "speed": "speed",
    "output": "output",
    "checkpoints and safety": "checkpoints and safety",
}


def presets() -> dict[str, Path]:
    """The presets shipped in ``cifar_resnet/configs``, by name."""
    folder = resources.files("cifar_resnet") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def _base_type(annotation: Any) -> Any:
    """``int`` for ``int | None``; the first non-None member of a union; the origin of a generic."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0]) if args else annotation
    return typing.get_origin(annotation) or annotation


def text_parser(annotation: Any, spec: Spec) -> Callable[[str], Any]:
    """How a command-line word becomes a value of this option (argparse reports a word it cannot read)."""
    base = _base_type(annotation)
    if spec.parse is not None:
        parse, what = spec.parse, "a valid value (see --help)"
    elif base in (tuple, list, float):
        parse, what = float, "a number"
    elif base is int:
        parse, what = int, "an integer"
    else:
        return str

    def read(word: str) -> Any:
        try:
            return parse(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {word!r}") from None

    return read


def _default_text(value: Any, spec: Spec | None = None) -> str:
    if value is None:
        return spec.none_word if spec is not None and spec.none_word else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """Every option as ``--name VALUE`` (switches as ``--name`` / ``--no_name``), plus ``--config``."""
    parser = OneLineErrorParser(
        prog="fit.py",
        usage="%(prog)s [--config PRESET|FILE] [--OPTION VALUE ...]",
        description="Train a ResNet on CIFAR-10 with PyTorch Lightning. Options can also come from a YAML file "
        "(--config PRESET|FILE, keys named as the flags); flags given here win over the file.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="PRESET|FILE",
        help=f"a YAML config, or a preset: {', '.join(sorted(presets()))}",
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config as YAML and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in SECTIONS:
        defaults = section()
        hints = field_types(section)
        for f, spec in specs(section):
            if not spec.cli:
                continue
            group = groups.get(spec.group) or groups.setdefault(
                spec.group, parser.add_argument_group(GROUP_TITLES.get(spec.group, spec.group))
            )
            _add_option(group, f.name, hints[f.name], spec, getattr(defaults, f.name))
    return parser


def _add_option(group: argparse._ArgumentGroup, name: str, annotation: Any, spec: Spec, default: Any) -> None:
    helptext = spec.help.replace("%", "%%")
    choices = spec.choice_list()
    if _base_type(annotation) is bool:
        on, off = f"--{name}", f"--no_{name}"
        state = f"on; {off} turns it off" if default else "off"
        group.add_argument(on, dest=name, action="store_const", const=True, help=f"{helptext} (default: {state})")
        group.add_argument(off, f"--no-{name}", *spec.aliases, dest=name, action="store_const", const=False,
                           help=argparse.SUPPRESS)  # fmt: skip
        return
    if name == "arch":
        helptext = f"{helptext}: {', '.join(choices or [])}"
        choices = None  # checked by the config with one clear line; argparse would print all names twice
    group.add_argument(
        f"--{name}",
        *spec.aliases,
        dest=name,
        type=text_parser(annotation, spec),
        choices=choices,
        nargs=spec.nargs,
        metavar=spec.metavar,
        help=f"{helptext} (default: {_default_text(default, spec)})",
    )


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """A preset (by name) or a YAML file of ``option: value`` pairs, with values parsed as the flags are."""
    known = presets()
    path = known.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise UserError(
            f"--config {name_or_path}: no such file and no such preset (presets: {', '.join(sorted(known))})"
        )
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"--config {path}: not valid YAML{line} ({getattr(err, 'problem', err)})") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected 'option: value' lines, got a {type(loaded).__name__}")
    return {str(key): _from_yaml(str(key), value) for key, value in loaded.items()}


def _from_yaml(name: str, value: Any) -> Any:
    """YAML gives typed values; a string for a non-text option (``1e-4``, ``0,1``) is parsed like a flag."""
    for section in SECTIONS:
        hints = field_types(section)
        for f, spec in specs(section):
            if f.name == name and isinstance(value, str) and _base_type(hints[name]) is not str:
                try:
                    return text_parser(hints[name], spec)(value)
                except (ValueError, argparse.ArgumentTypeError):
                    return value  # the option's check reports it, naming the option and the file
    return value


@dataclass
class FitRequest:
    """A resolved command line: the config, the names given explicitly, and where the file came from."""

    config: FitConfig
    explicit: set[str] = field(default_factory=set)
    from_file: dict[str, Any] = field(default_factory=dict)
    config_source: str | None = None
    print_config: bool = False


def resolve(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> FitRequest:
    """Defaults, then ``--config``, then the flags given; bad values end as a :class:`UserError`."""
    parser = parser or build_parser()
    given = vars(parser.parse_args(argv))
    source = given.pop("config", None)
    print_config = bool(given.pop("print_config", False))
    from_file = load_config_file(source) if source else {}
    try:
        config = FitConfig.from_flat({**from_file, **given})
    except OptionError as err:
        where = f" (in --config {source})" if source and err.name in from_file and err.name not in given else ""
        raise UserError(f"--{err.name} {err.problem}{where}") from None
    except ValueError as err:
        raise UserError(f"--config {source}: {err}; see fit.py --help for the option names") from None
    return FitRequest(config, set(given), from_file, source, print_config)


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with lists on one line: ``milestones: [0.5, 0.75]``."""


_ConfigDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def config_yaml(config: FitConfig, header: Sequence[str] = ()) -> str:
    """The config as YAML, one commented block per help group, replayable with ``--config``."""
    flat = config.flat()
    by_group: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        for f, spec in specs(section):
            if spec.cli:
                value = flat[f.name]
                by_group.setdefault(spec.group, {})[f.name] = (
                    spec.none_word if value is None and spec.none_word else value
                )
    lines = [f"# {line}" if line else "#" for line in header]
    for group, values in by_group.items():
        lines.append(f"# {GROUP_TITLES.get(group, group)}")
        lines.append(yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False).rstrip())
    return "\n".join(lines) + "\n"


def write_header(command: Sequence[str], environment: dict[str, str]) -> list[str]:
    """Comment lines for a run's config.yaml: how to replay it, when and where it ran."""
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return [
        "cifar_resnet run config; replay with: python scripts/fit.py --config THIS_FILE",
        f"written {when} by: {' '.join(command)}",
        *(f"{key}: {value}" for key, value in environment.items()),
        "",
    ]


def defaults_of(section: type) -> dict[str, Any]:
    """Default value of every option of ``section``."""
    return {f.name: (f.default if f.default is not MISSING else None) for f, _ in specs(section)}

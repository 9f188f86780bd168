"""Every option of a training run, defined once.

An option is a dataclass field carrying its type, default, help, check and help group. From the fields come
``scripts/fit.py``'s flags (``--name``, and ``--no_name`` for switches), the keys of a YAML config (the flag
names), the constructors' arguments (:class:`ModelConfig` for the LightningModule, :class:`DataConfig` for
the DataModule, :class:`TrainerConfig` for the Trainer factory) and the ``config.yaml`` every run writes.
Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cifar_resnet.data.images import IMAGE_SIZE
from cifar_resnet.models import list_models

# What a resumed run may change: "free" options change how a run is carried out (length, devices, logging);
# "fixed" ones change what it learns (data, split, model, optimisation), so a resume must keep them.
ResumeRule = Literal["fixed", "free"]


@dataclass(frozen=True)
class Spec:
    """How an option is shown and checked."""

    help: str
    group: str
    check: Callable[[Any], Any] | None = None  # returns the normalised value or raises ValueError("must be ...")
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    aliases: tuple[str, ...] = ()  # older flag spellings, still accepted
    parse: Callable[[str], Any] | None = None  # command-line text to a value (default: by the field's type)
    on_resume: ResumeRule = "fixed"
    cli: bool = True  # False: set by the program, not by the user
    none_word: str | None = None  # how None is written in configs and help (``auto``)

    def choice_list(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def option(default: Any, help: str, group: str, **spec: Any) -> Any:
    """A dataclass field that is an option."""
    return field(default=default, metadata={"spec": Spec(help, group, **spec)})


# ------------------------------------------------------------------------------------------------ checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"must be 0 or a positive integer, got {value!r}")
    return value


def any_int(value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def positive_float(value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def non_negative_float(value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise ValueError(f"must be 0 or a positive number, got {value!r}")
    return float(value)


def below_one(value: Any) -> float:
    """A fraction in [0, 1)."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"must be at least 0 and below 1, got {value!r}")
    return float(value)


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check``, or None."""
    return lambda value: None if value is None else check(value)


def one_of(*names: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
        return value

    return check


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def a_path(value: Any) -> str:
    """A file-system path as text (YAML may give a number for a folder named ``1``)."""
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise ValueError(f"must be a path, got {value!r}")
    return str(value)


def switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def batch_limit(value: Any) -> float | int | None:
    """Lightning's ``limit_*_batches``: a fraction in (0, 1] or a whole number of batches."""
    if value is None:
        return None
    if _is_int(value) and value >= 1:
        return value
    if isinstance(value, float) and 0 < value <= 1:
        return value
    raise ValueError(f"must be a fraction in (0, 1] or a number of batches (1 or more), got {value!r}")


def val_batch_limit(value: Any) -> float | int | None:
    """As :func:`batch_limit`, and 0: no validation at all."""
    return 0 if value == 0 and not isinstance(value, bool) else batch_limit(value)


def parse_batch_limit(text_value: str) -> float | int:
    """``0.5`` is a fraction; ``5``, ``5.0`` and ``1e3`` are batch counts; ``1.0`` is the whole epoch."""
    number = float(text_value)
    whole = number.is_integer() and number > 1
    return int(number) if whole or ("." not in text_value and "e" not in text_value.lower()) else number


def count_or_auto(value: Any) -> int | None:
    """A positive integer, or ``auto`` (None)."""
    if value is None or value == "auto":
        return None
    return positive_int(value)


def parse_count_or_auto(text_value: str) -> int | str:
    return text_value if text_value == "auto" else int(text_value)


def devices_value(value: Any) -> int | str | list[int]:
    """``auto``, a device count (``-1``: all), or a list of device ids."""
    if value == "auto":
        return value
    if _is_int(value) and (value >= 1 or value == -1):
        return value
    if isinstance(value, list | tuple) and value and all(_is_int(v) and v >= 0 for v in value):
        return list(value)
    raise ValueError(f"must be auto, a positive count, -1, or a list of device ids, got {value!r}")


def parse_devices(text_value: str) -> int | str | list[int]:
    """``auto``, ``2``, or ``0,1``."""
    if text_value == "auto":
        return text_value
    if "," in text_value:
        return [int(part) for part in text_value.split(",") if part.strip()]
    return int(text_value)


MAX_SEED = 2**32 - 1


def seed_value(value: Any) -> int:
    """A seed numpy (and so ``L.seed_everything``) accepts: 0 to 2**32 - 1."""
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be an integer from 0 to {MAX_SEED}, got {value!r}")
    return value


def below_image_side(value: Any) -> int:
    """Pixels of a crop padding or a cutout square: below the side of the images (every source is resized to
    ``IMAGE_SIZE``), so that no crop and no cutout can cover a whole image."""
    if not _is_int(value) or not 0 <= value < IMAGE_SIZE:
        raise ValueError(f"must be an integer from 0 to {IMAGE_SIZE - 1} (below the {IMAGE_SIZE}-pixel image side; "
                         f"0 is off), got {value!r}")  # fmt: skip
    return value


def four_jitters(value: Any) -> tuple[float, float, float, float] | None:
    """torchvision's ColorJitter ranges: brightness, contrast and saturation 0 or more, hue from 0 to 0.5."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise ValueError(f"must be four numbers (brightness contrast saturation hue), got {value!r}")
    if not all(_is_number(v) for v in value) or min(value[:3]) < 0 or not 0 <= value[3] <= 0.5:
        raise ValueError(f"must be brightness, contrast and saturation of 0 or more and a hue from 0 to 0.5 (a "
                         f"fraction of a turn each way), got {' '.join(map(str, value))}")  # fmt: skip
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def milestone_fractions(value: Any) -> tuple[float, ...]:
    """Increasing fractions of the run in (0, 1)."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"must be one or more fractions of the run, got {value!r}")
    fractions = tuple(float(v) if _is_number(v) else math.nan for v in value)
    if not all(0 < v < 1 for v in fractions) or list(fractions) != sorted(set(fractions)):
        raise ValueError(f"must be increasing fractions between 0 and 1, got {list(value)}")
    return fractions


def magnitude_bin(value: Any) -> int:
    """A RandAugment magnitude: a bin of torchvision's 31."""
    if not _is_int(value) or not 0 <= value <= 30:
        raise ValueError(f"must be an integer from 0 to 30, got {value!r}")
    return value


def arch_name(value: Any) -> str:
    names = list_models()
    if value not in names:
        raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ configs


class _Options:
    """Checks and normalises every field after construction (``dataclasses.replace`` included)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec: Spec = f.metadata["spec"]
            if spec.check is None:
                continue
            try:
                value = spec.check(getattr(self, f.name))
            except ValueError as err:
                raise OptionError(f.name, str(err)) from None
            object.__setattr__(self, f.name, value)


class OptionError(ValueError):
    """An option with a value it cannot take: ``name must be ..., got ...``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


MODEL, OPTIM, DATA, AUGMENT, TRAINER, SPEED, OUTPUT, RELIABILITY = (
    "model", "optimisation", "data", "augmentation", "trainer", "speed", "output", "checkpoints and safety",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig(_Options):
    """The network and how it is optimised: what :class:`~cifar_resnet.training.module.ImageClassifier` takes."""

    arch: str = option("resnet18", "architecture", MODEL, check=arch_name, choices=list_models, metavar="ARCH")
    num_classes: int = option(10, "classes (from the data)", MODEL, check=positive_int, cli=False)
    zero_init_residual: bool = option(False, "zero the last BN of each residual branch (Goyal et al. 2017)",
                                      MODEL, check=switch)  # fmt: skip
    lr: float = option(0.1, "peak learning rate (SGD)", OPTIM, check=positive_float)
    momentum: float = option(0.9, "SGD momentum", OPTIM, check=below_one)
    weight_decay: float = option(5e-4, "L2 weight decay", OPTIM, check=non_negative_float)
    nesterov: bool = option(False, "Nesterov momentum", OPTIM, check=switch)
    bn_bias_decay: bool = option(True, "apply weight decay to norm-layer weights and biases too", OPTIM,
                                 check=switch)  # fmt: skip
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", OPTIM, check=below_one)
    schedule: str = option("cosine", "LR after the warm-up: cosine to 0, multistep (x gamma at milestones), constant",
                           OPTIM, check=one_of("cosine", "multistep", "constant"),
                           choices=("cosine", "multistep", "constant"))  # fmt: skip
    milestones: tuple[float, ...] = option((0.5, 0.75), "multistep: fractions of the run where the LR decays",
                                           OPTIM, check=milestone_fractions, nargs="+", metavar="F")  # fmt: skip
    gamma: float = option(0.1, "multistep: factor at each milestone", OPTIM, check=positive_float)
    warmup_epochs: float = option(0.0, "linear LR warm-up before the schedule", OPTIM, check=non_negative_float)
    ema: float = option(0.0, "exponential moving average of the weights with this decay per step (e.g. 0.999); "
                        "validation, checkpoints, test and exports use the average; 0 is off", OPTIM,
                        check=below_one)  # fmt: skip
    swa_epochs: int = option(0, "stochastic weight averaging over the last N epochs at the constant --swa_lr "
                             "(Izmailov et al. 2018); 0 is off", OPTIM, check=non_negative_int)  # fmt: skip
    swa_lr: float = option(0.05, "the constant LR of the SWA epochs", OPTIM, check=positive_float)
    channels_last: bool = option(True, "NHWC memory format for convolutions (faster on CUDA and on the CPU)",
                                 SPEED, check=switch, on_resume="free")  # fmt: skip
    compile: bool = option(False, "torch.compile the network for training, once per run (slow start, faster steps; "
                           "evaluation runs eagerly)", SPEED, check=switch,
                           on_resume="free")  # fmt: skip
    cuda_graphs: bool = option(True, "replay each training step as one CUDA graph (one process on a GPU; not "
                               "with 16-mixed)", SPEED, check=switch, on_resume="free")  # fmt: skip


@dataclass(frozen=True)
class DataConfig(_Options):
    """Where images come from, the split and the batches: what :class:`~cifar_resnet.data.CIFARDataModule` takes."""

    dataset: str = option("auto", "cifar10 / cifar100: torchvision's files in --data_dir; imagefolder: "
                          "DIR/train/<class>/*; auto: imagefolder when DIR/train exists, else cifar10", DATA,
                          check=one_of("auto", "cifar10", "cifar100", "imagefolder"),
                          choices=("auto", "cifar10", "cifar100", "imagefolder"))  # fmt: skip
    data_dir: str = option("./data", "DIR/train/<class>/*.png|jpg (optional DIR/test/...), or torchvision's "
                           "CIFAR-10/100 files in DIR", DATA, check=a_path,
                           on_resume="free")  # fmt: skip  # a moved folder; its contents are checked on resume
    download: bool = option(False, "download --dataset cifar10/cifar100 into --data_dir when its files are missing "
                            "(into the default ./data even without this)", DATA, check=switch,
                            on_resume="free")  # fmt: skip
    val_size: int = option(5000, "training images held out for validation (stratified); 0 validates on the "
                           "test split", DATA, check=non_negative_int)  # fmt: skip
    seed: int = option(0, "seeds the weights, the split, the data order and the augmentation (0 to 2**32 - 1)", DATA,
                       check=seed_value)  # fmt: skip
    batch_size: int = option(128, "training batch size per process", DATA, check=positive_int)
    eval_batch_size: int = option(1024, "validation and test batch size", DATA, check=positive_int, on_resume="free")
    num_workers: int = option(0, "DataLoader worker processes (batches come from memory: 0 is usually fastest)",
                              DATA, check=non_negative_int, on_resume="free")  # fmt: skip
    cache_dir: str | None = option(None, "decoded image-folder cache (default ~/.cache/cifar_resnet)", DATA,
                                   check=optional(a_path), on_resume="free")  # fmt: skip
    data_on_device: bool = option(True, "keep the uint8 data set on the GPU and index batches there (CUDA only)",
                                  SPEED, check=switch, on_resume="free")  # fmt: skip
    crop_padding: int = option(4, "random-crop padding in pixels (below the image side); 0 is off", AUGMENT,
                              check=below_image_side)  # fmt: skip
    hflip: bool = option(True, "random horizontal flip", AUGMENT, check=switch, aliases=("--no-hflip",))
    color_jitter: tuple[float, float, float, float] | None = option(
        None, "colour jitter: brightness contrast saturation (0 or more) hue (0 to 0.5)", AUGMENT,
        check=four_jitters, nargs=4, metavar=("B", "C", "S", "H"))  # fmt: skip
    random_resized_crop: bool = option(False, "random resized crop (scale 0.1-1, ratio 0.5-2) before the padded "
                                       "crop", AUGMENT, check=switch)  # fmt: skip
    cutout: int = option(0, "cutout square side in pixels (below the image side); 0 is off", AUGMENT,
                        check=below_image_side)  # fmt: skip
    policy: str = option("none", "per-image augmentation policy after crop and flip: AutoAugment (CIFAR-10 policy), "
                         "RandAugment or TrivialAugmentWide", AUGMENT,
                         check=one_of("none", "autoaugment", "randaugment", "trivialaugment"),
                         choices=("none", "autoaugment", "randaugment", "trivialaugment"))  # fmt: skip
    randaugment_num_ops: int = option(2, "RandAugment: ops per image", AUGMENT, check=positive_int)
    randaugment_magnitude: int = option(9, "RandAugment: magnitude bin (0-30)", AUGMENT, check=magnitude_bin)
    mixup: float = option(0.0, "MixUp with lambda ~ Beta(ALPHA, ALPHA), one per batch; 0 is off", AUGMENT,
                          check=non_negative_float, metavar="ALPHA")  # fmt: skip
    cutmix: float = option(0.0, "CutMix with lambda ~ Beta(ALPHA, ALPHA), one per batch; with --mixup too, each "
                           "batch takes one of the two with probability 0.5; 0 is off", AUGMENT,
                           check=non_negative_float, metavar="ALPHA")  # fmt: skip


@dataclass(frozen=True)
class TrainerConfig(_Options):
    """The run's length, placement, precision, logging and safety nets: what the Trainer factory takes."""

    max_epochs: int = option(200, "epochs to train", TRAINER, check=positive_int, on_resume="free")
    precision: str = option("auto", "auto: bf16-mixed on GPUs with bf16, 16-mixed on older GPUs, 32-true on the CPU",
                            TRAINER, check=one_of("auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"),
                            choices=("auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"),
                            on_resume="free")  # fmt: skip
    accelerator: str = option("auto", "device type", TRAINER, check=one_of("auto", "cpu", "gpu", "cuda", "mps"),
                              choices=("auto", "cpu", "gpu", "cuda", "mps"), on_resume="free")  # fmt: skip
    devices: int | str | list[int] = option(1, "processes per machine, one per GPU: 1 trains the documented recipe "
                                            "on any machine; N, a comma list of GPU ids, or auto (every GPU) "
                                            "train N processes with N times the global batch and the LR as given",
                                            TRAINER, check=devices_value, parse=parse_devices,
                                            on_resume="free")  # fmt: skip
    num_nodes: int = option(1, "machines the run spans; --devices counts processes per machine", TRAINER,
                            check=positive_int, on_resume="free")  # fmt: skip
    strategy: str = option("auto", "Lightning strategy, e.g. ddp", TRAINER, check=text, on_resume="free")
    sync_batchnorm: bool = option(False, "batch-norm statistics over all processes' batches (SyncBatchNorm), for "
                                  "small batches per GPU", TRAINER, check=switch, on_resume="free")  # fmt: skip
    deterministic: bool = option(False, "deterministic algorithms and no cudnn.benchmark: a resume on a GPU is then "
                                 "bitwise exact on the same GPU model and torch/CUDA versions (slower on a GPU)",
                                 TRAINER, check=switch, on_resume="free")  # fmt: skip
    limit_train_batches: float | int | None = option(
        None, "train on this fraction (<= 1.0) or number of batches per epoch", TRAINER, check=batch_limit,
        parse=parse_batch_limit)  # fmt: skip
    limit_val_batches: float | int | None = option(
        None, "validate on this fraction (<= 1.0) or number of batches; 0: no validation", TRAINER,
        check=val_batch_limit,
        parse=parse_batch_limit)  # fmt: skip
    fast_dev_run: bool = option(False, "one batch of train, val and test; nothing saved", TRAINER, check=switch,
                                on_resume="free")  # fmt: skip
    log_dir: str = option("lightning_logs", "runs land in LOG_DIR/<arch>/version_N", OUTPUT, check=a_path,
                          on_resume="free")  # fmt: skip
    logger: str = option("tensorboard", "where metrics, images and figures go: tensorboard event files, csv "
                         "(metrics.csv), mlflow or wandb (the extras of the same name), all in the run folder", OUTPUT,
                         check=one_of("tensorboard", "csv", "mlflow", "wandb"),
                         choices=("tensorboard", "csv", "mlflow", "wandb"), on_resume="free")  # fmt: skip
    mlflow_tracking_uri: str | None = option(None, "--logger mlflow: tracking server or store URI (default: a "
                                             "file store in the run folder, RUN/mlruns)", OUTPUT, check=optional(text),
                                             metavar="URI", on_resume="free")  # fmt: skip
    wandb_project: str = option("cifar_resnet", "--logger wandb: the W&B project (WANDB_MODE=offline: no account "
                                "needed, sync later)", OUTPUT, check=text, on_resume="free")  # fmt: skip
    progress: str = option("auto", "auto: a bar on a terminal, plain lines otherwise", OUTPUT,
                           check=one_of("auto", "bar", "lines", "none"), choices=("auto", "bar", "lines", "none"),
                           on_resume="free")  # fmt: skip
    log_every_n_steps: int = option(50, "write step scalars (loss, lr) every N optimizer steps", OUTPUT,
                                    check=positive_int, on_resume="free")  # fmt: skip
    confusion_every_n_epochs: int | None = option(
        None, "draw the validation confusion matrix every N epochs and after the last; auto: within 2% of the "
        "run's time", OUTPUT, check=count_or_auto, parse=parse_count_or_auto, metavar="N|auto",
        on_resume="free", none_word="auto")  # fmt: skip
    ckpt_every_n_steps: int | None = option(None, "also rewrite last.ckpt every N optimizer steps", RELIABILITY,
                                            check=optional(positive_int), on_resume="free")  # fmt: skip
    max_nonfinite_steps: int = option(3, "stop after this many consecutive NaN/inf training losses", RELIABILITY,
                                      check=positive_int, on_resume="free")  # fmt: skip


@dataclass(frozen=True)
class RunConfig(_Options):
    """What ``scripts/fit.py`` does around training."""

    ckpt_path: str | None = option(
        None, "continue a run: its checkpoint; last: the newest last.ckpt under --log_dir (of --arch when given); "
        "auto: the same, or a new run when there is none (for batch scripts that are requeued)", RELIABILITY,
        check=optional(a_path), on_resume="free")  # fmt: skip
    test: bool = option(True, "evaluate the best checkpoint on the test split at the end", OUTPUT, check=switch,
                        on_resume="free")  # fmt: skip
    describe_data: bool = option(False, "print per-class counts of each split and the training mean/std, then exit",
                                 DATA, check=switch, on_resume="free")  # fmt: skip


SECTIONS: tuple[type[_Options], ...] = (ModelConfig, DataConfig, TrainerConfig, RunConfig)


def specs(section: type[_Options]) -> list[tuple[dataclasses.Field[Any], Spec]]:
    """The option fields of a config class, in order."""
    return [(f, f.metadata["spec"]) for f in dataclasses.fields(section)]  # type: ignore[arg-type]


def field_types(section: type[_Options]) -> dict[str, Any]:
    return typing.get_type_hints(section)


@dataclass(frozen=True)
class FitConfig:
    """Every option of a fit, by the part that consumes it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def parts(self) -> tuple[_Options, ...]:
        return (self.model, self.data, self.trainer, self.run)

    def flat(self) -> dict[str, Any]:
        """One mapping of option name to value: the keys of a YAML config."""
        values: dict[str, Any] = {}
        for part in self.parts():
            values.update({f.name: _plain(getattr(part, f.name)) for f, _ in specs(type(part))})
        return values

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], base: FitConfig | None = None) -> FitConfig:
        """``base`` (default: the defaults) with ``values`` set; unknown names and bad values raise ValueError."""
        base = base or cls()
        known = {f.name for section in SECTIONS for f, _ in specs(section)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        parts = []
        for part in base.parts():
            names = {f.name for f, _ in specs(type(part))}
            parts.append(dataclasses.replace(part, **{k: v for k, v in values.items() if k in names}))
        return cls(*parts)  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    """Tuples as lists, as YAML and JSON write them."""
    return list(value) if isinstance(value, tuple) else value


def option_spec(name: str) -> Spec:
    """The spec of the option ``name``."""
    for section in SECTIONS:
        for f, spec in specs(section):
            if f.name == name:
                return spec
    raise KeyError(name)


# Options saved under earlier names (checkpoints written before options were defined here).
_RENAMED = {"compile_model": "compile", "data_seed": "seed", "no_bn_bias_decay": "bn_bias_decay", "no_test": "test"}
_NEGATED = {"no_bn_bias_decay", "no_test"}


def upgrade_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with options saved under earlier names under today's (negated where the meaning flipped)."""
    upgraded: dict[str, Any] = {}
    for key, value in values.items():
        if key in _RENAMED:
            upgraded[_RENAMED[key]] = (not value) if key in _NEGATED else value
        else:
            upgraded[key] = value
    return upgraded


def config_of(section: type[_Options], values: Mapping[str, Any]) -> Any:
    """``section`` built from the entries of ``values`` it has (earlier names upgraded, others ignored)."""
    names = {f.name for f, _ in specs(section)}
    return section(**{k: v for k, v in upgrade_names(values).items() if k in names})


def as_dict(config: _Options) -> dict[str, Any]:
    """A config as plain values (tuples as lists), e.g. for checkpoints and hyperparameter tables."""
    return {f.name: _plain(getattr(config, f.name)) for f, _ in specs(type(config))}

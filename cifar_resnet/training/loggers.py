"""The experiment logger of a run (``--logger``): Lightning's TensorBoard, CSV, MLflow or W&B logger, writing
into the run's folder ``LOG_DIR/<arch>/version_N`` so that a resumed run continues the same record.

- tensorboard: event files in the run folder (as before).
- csv: ``metrics.csv`` and ``hparams.yaml`` in the run folder.
- mlflow: a local file store in ``<run>/mlruns`` (``--mlflow_tracking_uri`` for a server or another store);
  experiment = the architecture, run name = ``version_N``; the run id is kept in ``<run>/mlflow_run.json``.
- wandb: ``<run>/wandb/`` (``WANDB_MODE=offline`` writes an offline run there to ``wandb sync`` later);
  project ``--wandb_project``, run name ``<arch>/version_N``; the run id is kept in ``<run>/wandb_run.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cifar_resnet.config import TrainerConfig
from cifar_resnet.errors import UserError
from cifar_resnet.fileio import atomic_write_text
from cifar_resnet.training.runs import RunLocation

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # --logger: the module it needs (the extra has the same name)
MLFLOW_RUN_FILE = "mlflow_run.json"
WANDB_RUN_FILE = "wandb_run.json"


def check_logger_package(kind: str) -> None:
    """A UserError naming the extra to install when ``--logger kind`` needs a package that is missing or broken."""
    module = _PACKAGES.get(kind)
    if module is None:
        return
    install = f'pip install -e ".[{kind}]"'
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--logger {kind} needs {module}: {install}")
    try:
        importlib.import_module(module)
    except Exception as err:  # a half-installed package fails in many ways; all mean "reinstall it"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--logger {kind} needs {module}, which does not import ({reason[:160]}): {install}") from err


class _AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but a ``metrics.csv`` already in the folder is continued, not deleted.

    Lightning's writer deletes the file when its folder is not empty; a resumed run writes into its own
    folder again, and its curves must keep their first part (later rows of a step win when read back).
    """

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class RunFolderCSVLogger(CSVLogger):
    """``CSVLogger`` writing into the run folder and continuing its ``metrics.csv`` on resume."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return super().experiment


def _read_run_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_run_file(path: Path, values: dict[str, Any]) -> None:
    if rank_zero_only.rank == 0 and path.parent.is_dir():
        atomic_write_text(json.dumps(values, indent=1) + "\n", path)  # a killed run never leaves half an id


def _mlflow_logger(config: TrainerConfig, run_folder: Path, name: str, run_name: str) -> Logger:
    from lightning.pytorch.loggers import MLFlowLogger

    uri = config.mlflow_tracking_uri or (run_folder / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked (it wants a database server, or sqlite, which needs
        # SQLAlchemy and full mlflow); a run's own local store is exactly the file store's use.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    record = run_folder / MLFLOW_RUN_FILE
    stored = _read_run_file(record)
    run_id = stored.get("run_id") if stored.get("tracking_uri") == uri else None

    class RunFolderMLFlowLogger(MLFlowLogger):
        """MLFlowLogger that continues the run folder's MLflow run, and whose ``log_dir`` is the run folder."""

        @property
        def log_dir(self) -> str:
            return str(run_folder)

        @property
        def experiment(self) -> Any:
            client = super().experiment
            if self._run_id is not None and not record.is_file():
                _write_run_file(record, {"tracking_uri": uri, "run_id": self._run_id})
            return client

        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            # MLflow keeps a parameter's first value and refuses another one: a resumed run that changed a free
            # option (say --max_epochs) would stop here. The new values are in the run's config.resumeN.yaml.
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

            flat = _flatten_dict(_convert_params(params) or {})
            logged = self.experiment.get_run(self.run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v))
            if changed:
                rank_zero_info(f"MLflow keeps the first value of a run's parameters; not updated: {', '.join(changed)}")
            super().log_hyperparams({k: v for k, v in flat.items() if k not in logged})

    return RunFolderMLFlowLogger(experiment_name=name, run_name=run_name, tracking_uri=uri, run_id=run_id)


def _wandb_logger(config: TrainerConfig, run_folder: Path, name: str, run_name: str) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    record = run_folder / WANDB_RUN_FILE
    run_id = _read_run_file(record).get("run_id")
    if run_id is None:
        run_id = secrets.token_hex(6)  # W&B ids are letters and digits; fixed here so a resume finds the run
        _write_run_file(record, {"project": config.wandb_project, "run_id": run_id})

    class RunFolderWandbLogger(WandbLogger):
        """WandbLogger whose ``log_dir`` is the run folder (W&B keeps its own files in ``<run>/wandb``)."""

        @property
        def log_dir(self) -> str:
            return str(run_folder)

    return RunFolderWandbLogger(
        name=f"{name}/{run_name}", project=config.wandb_project, save_dir=str(run_folder), id=run_id, resume="allow"
    )


def build_logger(config: TrainerConfig, location: RunLocation | None, name: str) -> Logger:
    """``--logger``'s Lightning logger, writing into ``location`` (None: a folder Lightning picks under
    ``--log_dir``, for the processes other than the first when no folder was claimed for them)."""
    check_logger_package(config.logger)
    save_dir = str(location.save_dir) if location else config.log_dir
    folder_name = location.name if location else name
    version = location.version if location else None
    if config.logger == "tensorboard":
        return TensorBoardLogger(save_dir=save_dir, name=folder_name, version=version, default_hp_metric=False)
    if config.logger == "csv":
        return RunFolderCSVLogger(save_dir=save_dir, name=folder_name, version=version)
    run_folder = location.path if location else Path(config.log_dir) / name / "unclaimed"
    run_name = location.version if location else "unclaimed"
    if config.logger == "mlflow":
        return _mlflow_logger(config, run_folder, name, run_name)
    if config.logger == "wandb":
        return _wandb_logger(config, run_folder, name, run_name)
    raise UserError(f"--logger must be one of {', '.join(LOGGERS)}, got {config.logger!r}")

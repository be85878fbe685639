"""Experiment tracking: every metrics row goes to ``metrics.jsonl`` and to the trackers a job is configured
for (MLflow, TensorBoard, Weights & Biases), with the same figures at the same steps; the resolved config
is saved as ``config.yaml`` and logged with the run.

The libraries are used directly from the training process that writes ``metrics.jsonl`` (rank 0): that is
what Ray's own integrations do inside a Ray Train worker (``ray.air.integrations.mlflow.setup_mlflow`` and
``ray.air.integrations.wandb.setup_wandb`` only configure the library there; Ray's TensorBoard logger is a
Tune callback, and ours is a Ray Train loop). TensorBoard files are written with tensorboardX, the
writer Ray's ``TBXLoggerCallback`` uses.

    tracking: {report_to: [mlflow, tensorboard], mlflow_tracking_uri: http://mlflow:5000}
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
import yaml

from llm_platform.errors import ConfigError
from llm_platform.training.config import TrackingSettings
from llm_platform.training.outputs import MetricsLog

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}


def check_tracking(tracking: TrackingSettings) -> None:
    """Fail before training when a configured tracker's library is not installed."""
    for name in tracking.report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"tracking.report_to: {name} needs the {PACKAGES[name]!r} package, which is not "
                              f"installed (pip install {PACKAGES[name] if name != 'mlflow' else 'mlflow-skinny'})")


def tracker(cfg, folder: Path, job: str, resume_step: int | None = None) -> "RunTracker":
    """The run tracker of a job config with ``tracking`` and ``run_name`` (rank 0 only)."""
    return RunTracker(folder, cfg.tracking, cfg.run_name, job, cfg.model_dump(mode="json"), resume_step)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"learning_rate": 1e-3}}`` -> ``{"optim.learning_rate": "0.001"}`` (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunTracker:
    """``metrics.jsonl`` plus the configured trackers. ``write(row)`` logs a row (its ``step`` is the step);
    ``finish(summary)`` logs the final figures and closes the run. Only the main process makes one."""

    def __init__(self, folder: Path, tracking: TrackingSettings, run_name: str, job: str, config: dict,
                 resume_step: int | None = None):
        self.metrics = MetricsLog(folder, resume_step=resume_step)
        self.folder, self.tracking = folder, tracking
        experiment = tracking.experiment or f"llmp-{job}"
        self._mlflow = self._tb = self._wandb = None
        if "mlflow" in tracking.report_to:
            self._mlflow = _MLflowRun(folder, tracking.mlflow_tracking_uri, experiment, run_name, config,
                                      resume=resume_step is not None)
        if "tensorboard" in tracking.report_to:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(folder / "tensorboard" / run_name), purge_step=resume_step)
            self._tb.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)
        if "wandb" in tracking.report_to:
            import wandb

            self._wandb = wandb.init(project=experiment, name=run_name, dir=str(folder), config=config,
                                     mode=tracking.wandb_mode, resume="allow", id=run_name)

    def write(self, row: dict) -> None:
        self.metrics.write(row)
        figures = numeric(row)
        step = int(figures.pop("step", figures.pop("iteration", 0)))  # PPO's rows count iterations
        if not figures:
            return
        if self._mlflow:
            self._mlflow.log(figures, step)
        if self._tb:
            for key, value in figures.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(figures, step=step)

    def rows(self) -> list[dict]:
        return self.metrics.rows()

    def finish(self, summary: dict | None = None) -> None:
        """Log the final figures (``summary``, or the ``summary.json`` already written) and close the run."""
        if summary is None and (self.folder / "summary.json").exists():
            summary = json.loads((self.folder / "summary.json").read_text())
        figures = {f"final/{k}": v for k, v in numeric(summary or {}).items()}
        step = int((summary or {}).get("steps") or (summary or {}).get("iterations") or 0)
        if self._mlflow:
            self._mlflow.finish(figures, step, summary)
        if self._tb:
            for key, value in figures.items():
                self._tb.add_scalar(key, value, step)
            self._tb.close()
        if self._wandb:
            self._wandb.summary.update(numeric(summary or {}))
            self._wandb.finish()


class _MLflowRun:
    """One MLflow run through ``MlflowClient`` (no global active run: a Ray worker may host several)."""

    def __init__(self, folder: Path, uri: str | None, experiment: str, run_name: str, config: dict, resume: bool):
        from mlflow.tracking import MlflowClient

        if uri is None:
            uri = f"file:{folder / 'mlruns'}"
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it needs no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        previous = self.client.search_runs([experiment_id], f"tags.`mlflow.runName` = '{run_name}'",
                                           order_by=["attributes.start_time DESC"], max_results=1) if resume else []
        if previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log(self, figures: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def finish(self, figures: dict[str, float], step: int, summary: dict | None) -> None:
        if figures:
            self.log(figures, step)
        if summary:
            self.client.log_text(self.run_id, json.dumps(summary, indent=2, sort_keys=True), "summary.json")
        self.client.set_terminated(self.run_id)

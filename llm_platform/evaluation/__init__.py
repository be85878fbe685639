"""The course's experiments as commands: latency by model size, prompting styles, ROUGE/BLEU and
forgetting after fine-tuning, and the memory planner.

    llmp eval latency    [--config FILE] [key=value ...] [--json F] [--plot F]
    llmp eval prompting  [--config FILE] ...
    llmp eval generation [--config FILE] variants.lora=DIR variants.full=DIR ...
    llmp plan --params 7e9 [--method all] [--dtype all] [--json F] [--plot F]

Each module has the same names, so the CLI treats them alike: ``Config`` (a frozen config),
``run(cfg) -> dict`` (the figures, JSON-ready), ``table(summary) -> str`` and ``plot(summary,
path)``. Where engines or scoring models are needed, the function behind ``run`` also accepts
ones built by the caller, so tests share theirs instead of starting new ones.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from llm_platform.errors import PlatformError

CONFIG_DIR = Path(__file__).with_name("configs")
COMMANDS = ("latency", "prompting", "generation")


class EvaluationError(PlatformError, ValueError):
    """An evaluation cannot run as configured (a missing variant, an unreachable endpoint)."""


def local_config(command: str) -> Path:
    """The config that runs ``command`` on the tiny local models."""
    return CONFIG_DIR / f"{command}_local.yaml"


def run_command(command: str, config: str | None, overrides: list[str], json_path: str | None = None,
                plot_path: str | None = None) -> dict:
    """Load the command's config (the local one by default), run it and publish the figures."""
    import importlib
    import os

    from llm_platform.config import load_config

    # The config is checked before anything heavy is imported: a bad key is reported in a second, not ten.
    module = importlib.import_module(f"llm_platform.evaluation.{command}")
    cfg = load_config(module.Config, config or local_config(command), overrides)

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one progress bar per command: its own
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout by default
    summary = module.run(cfg)
    publish(module, summary, json_path, plot_path)
    return summary


def publish(module: ModuleType, summary: dict, json_path: str | None, plot_path: str | None) -> None:
    """The table on stdout; JSON and PNG where asked, reported on stderr to keep stdout the table."""
    from llm_platform.report import write_json

    print("\n" + module.table(summary), flush=True)
    if json_path:
        write_json(json_path, summary)
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_path:
        module.plot(summary, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)

"""What a LoRA rank × learning-rate search is: its config, the space Tune samples, and each trial's SFT config.

A trial is the SFT job's own config (``train_jobs/configs/*.yaml`` plus overrides) with three
things changed: the LoRA rank and learning rate Tune proposed, and alpha derived from the rank
by ``alpha_rule``. Every trial (and the baseline) gets the same step budget and validation
schedule, so their losses are comparable step for step and ASHA's rungs fall on reported steps.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from llm_platform.config import FrozenConfig, deep_merge
from llm_platform.training.config import SFTConfig

_MULTIPLE = re.compile(r"^(\d+(?:\.\d+)?)?r$")
_FIXED = re.compile(r"^fixed:(\d+)$")


def alpha_for(rule: str, rank: int) -> int:
    """LoRA alpha for ``rank``: ``r`` (alpha = rank), ``2r`` (any multiple, e.g. ``0.5r``) or ``fixed:N``.
    With a multiple of r the update's scale alpha/r stays the same at every rank; with a fixed
    alpha it shrinks as the rank grows."""
    if match := _MULTIPLE.match(rule):
        return max(1, round(float(match.group(1) or 1) * rank))
    if match := _FIXED.match(rule):
        return int(match.group(1))
    raise ValueError(f"alpha_rule {rule!r}: expected 'r', a multiple such as '2r', or 'fixed:N'")


class TuneSearchConfig(FrozenConfig):
    """A LoRA rank × learning-rate search (``python -m tune_spaces.lora_rank_lr --config FILE``).
    (Not named ``TuneConfig``: that is Ray Tune's own class, used beside this one.)"""

    sft_config: str = "train_jobs/configs/local_lora.yaml"
    """The SFT job config every trial starts from (relative paths: from the repository); its own LoRA
    settings and learning rate are the baseline the search is compared with."""
    sft_overrides: list[str] = []
    """key=value overrides of that config for every trial and the baseline, e.g. ``[model=..., data.eval_limit=64]``."""
    ranks: list[int] = Field([2, 4, 8, 16, 32, 64], min_length=1)
    """LoRA ranks to choose from."""
    lr_min: float = Field(3e-4, gt=0)
    """Lowest learning rate (searched log-uniformly between lr_min and lr_max)."""
    lr_max: float = Field(1e-2, gt=0)
    """Highest learning rate."""
    alpha_rule: str = "2r"
    """How alpha follows the rank: ``r``, a multiple such as ``2r``, or ``fixed:N``."""
    num_samples: int = Field(8, ge=1)
    """Trials in the search."""
    max_concurrent: int = Field(2, ge=1)
    """Trials running at once (each a Ray Train run of the SFT config's ``scaling``)."""
    random_trials: int = Field(4, ge=1)
    """Trials Optuna samples at random before its TPE model starts proposing from the results."""
    max_steps: int = Field(160, ge=1)
    """Optimizer steps of a trial that runs to the end (the baseline gets the same)."""
    eval_every: int = Field(20, ge=1)
    """Steps between validation losses: what ASHA compares, so its rungs must fall on these."""
    grace_period: int = Field(40, ge=1)
    """Steps every trial runs before ASHA may stop it (its first rung)."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA keeps about 1/reduction_factor of the trials at each rung; rungs are grace_period × factor^k."""
    trial_retries: int = Field(1, ge=0)
    """Times Tune reruns a failed trial (Ray Train's own worker restarts are off inside a search)."""
    seed: int = 0
    """Seed of Optuna's sampler (each trial trains with the SFT config's own seed)."""
    baseline: bool = True
    """Also train the SFT config's own LoRA settings with the same step budget, to compare the best with."""
    output_dir: str = "artifacts/tune/lora_rank_lr"
    """Where results.csv, summary.json, search.png, best_adapter/ and each trial's SFT outputs go."""
    storage_path: str | None = None
    """Tune's experiment state and Ray Train's checkpoints (folder or URI); defaults to output_dir."""
    run_name: str = "tune"
    """Tune experiment name under storage_path; starting again with the same one resumes it."""
    register_url: str | None = None
    """A running server (http://host:port) to register the best adapter with."""
    register_base: str | None = None
    """The server's id of the base model (default: the base model folder's name, e.g. tiny-m)."""
    register_name: str = "tuned-lora"
    """Adapter name for registration."""

    @field_validator("alpha_rule")
    @classmethod
    def _rule(cls, rule: str) -> str:
        alpha_for(rule, 8)
        return rule

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, ranks: list[int]) -> list[int]:
        if any(r < 1 or r > 1024 for r in ranks):
            raise ValueError(f"ranks must be between 1 and 1024 (got {ranks})")
        return sorted(set(ranks))

    @model_validator(mode="after")
    def _check(self) -> "TuneSearchConfig":
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be below lr_max ({self.lr_max})")
        if self.max_steps % self.eval_every:
            raise ValueError(f"max_steps ({self.max_steps}) must be a multiple of eval_every ({self.eval_every})")
        if self.grace_period % self.eval_every or self.grace_period >= self.max_steps:
            raise ValueError(f"grace_period ({self.grace_period}) must be a multiple of eval_every "
                             f"({self.eval_every}) and below max_steps ({self.max_steps})")
        return self

    def settings(self) -> dict:
        """What decides the trials and their results (not where outputs go or who gets the adapter)."""
        return self.model_dump(exclude={"output_dir", "storage_path", "register_url", "register_base",
                                        "register_name"})


def search_space(search: TuneSearchConfig) -> dict:
    """Tune's param_space: a rank from the choices and a log-uniform learning rate."""
    from ray import tune

    return {"rank": tune.choice(search.ranks), "lr": tune.loguniform(search.lr_min, search.lr_max)}


def budgeted(search: TuneSearchConfig, base: SFTConfig, folder: Path, name: str,
             changes: dict | None = None) -> SFTConfig:
    """``base`` with the search's step budget and validation schedule, writing into ``folder``, with
    ``changes`` (nested keys) on top. Validated again, so e.g. a rank out of range fails here."""
    update = {"output_dir": str(folder), "run_name": name, "register_url": None,
              "optim": {"max_steps": search.max_steps, "eval_every": search.eval_every,
                        "log_every": search.eval_every, "save_every": 0}}
    return SFTConfig.model_validate(deep_merge(base.model_dump(), deep_merge(update, changes or {})))


def trial_config(search: TuneSearchConfig, base: SFTConfig, rank: int, lr: float, folder: Path,
                 name: str) -> SFTConfig:
    """The SFT config of one trial: this rank, alpha by the rule, this learning rate. Ray Train does not
    restart the trial's workers itself (Tune reruns a failed trial instead): see ``trials.py``."""
    return budgeted(search, base, folder, name, {"lora": {"r": rank, "alpha": alpha_for(search.alpha_rule, rank)},
                                                 "optim": {"learning_rate": lr},
                                                 "scaling": {"max_failures": 0}})

"""The search config, alpha rule and per-trial SFT configs: validated before any Ray work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_platform.config import load_config
from llm_platform.errors import ConfigError
from llm_platform.training.config import SFTConfig
from llm_platform.tuning.space import TuneSearchConfig, alpha_for, budgeted, search_space, trial_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tune_spaces" / "configs" / "local.yaml"


def test_local_config_searches_both_settings_with_at_least_eight_trials():
    search = load_config(TuneSearchConfig, CONFIG)
    assert search.num_samples >= 8 and len(search.ranks) > 1 and search.lr_min < search.lr_max
    space = search_space(search)
    assert set(space) == {"rank", "lr"}
    assert space["rank"].categories == search.ranks
    assert (space["lr"].lower, space["lr"].upper) == (search.lr_min, search.lr_max)


@pytest.mark.parametrize(("override", "message"), [
    ("alpha_rule=3x", "alpha_rule .*expected 'r', a multiple such as '2r', or 'fixed:N'"),
    ("alpha_rule=fixed:", "alpha_rule"),
    ("lr_min=0.1", r"lr_min \(0.1\) must be below lr_max"),
    ("num_sample=3", "num_sample: unknown key \\(did you mean 'num_samples'\\?\\)"),
    ("grace_period=30", "grace_period .*multiple of eval_every"),
    ("max_steps=150", "max_steps .*multiple of eval_every"),
    ("ranks=[4, 2048]", "ranks must be between 1 and 1024"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TuneSearchConfig, CONFIG, [override])


def test_alpha_follows_the_rule():
    assert [alpha_for("2r", 8), alpha_for("r", 8), alpha_for("0.5r", 8), alpha_for("fixed:16", 64)] == [16, 8, 4, 16]
    assert alpha_for("0.5r", 1) == 1  # never 0


def test_a_trial_is_the_sft_config_with_its_rank_alpha_and_rate(tmp_path):
    search = load_config(TuneSearchConfig, CONFIG, ["alpha_rule=fixed:32"])
    base = load_config(SFTConfig, REPO / "train_jobs" / "configs" / "local_lora.yaml")
    cfg = trial_config(search, base, 16, 1e-3, tmp_path / "t1", "t1")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.learning_rate) == (16, 32, 1e-3)
    assert (cfg.optim.max_steps, cfg.optim.eval_every, cfg.optim.log_every) == (search.max_steps,) + (search.eval_every,) * 2
    assert (cfg.output_dir, cfg.run_name, cfg.scaling.max_failures) == (str(tmp_path / "t1"), "t1", 0)
    assert (cfg.lora.dropout, cfg.lora.target_modules, cfg.data) == (base.lora.dropout, base.lora.target_modules,
                                                                      base.data)
    default = budgeted(search, base, tmp_path / "b", "baseline")
    assert (default.lora, default.optim.learning_rate, default.optim.max_steps) == (base.lora, base.optim.learning_rate,
                                                                                     search.max_steps)

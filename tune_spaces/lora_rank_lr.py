"""Entry point of the LoRA rank x learning-rate search: ``python -m tune_spaces.lora_rank_lr --config FILE``,
locally or under ``ray job submit``. The search is ``llm_platform.tuning.search``."""

import sys

from llm_platform.tuning.search import __doc__ as DOC, cli

if __name__ == "__main__":
    sys.exit(cli(DOC))

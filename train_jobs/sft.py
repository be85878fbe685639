"""Entry point of the sft job: ``python -m train_jobs.sft --config FILE [key=value ...]``, locally or
under ``ray job submit``. The job is ``llm_platform.training.sft_job`` (its docstring says what it does and writes)."""

import sys

from llm_platform.training.job import cli
from llm_platform.training.sft_job import JOB, __doc__ as DOC

if __name__ == "__main__":
    sys.exit(cli(JOB, DOC))

"""Keys the server checks, carried to its replicas without showing up where operators look.

Ray shows a deployment's ``runtime_env`` (its ``env_vars`` included) in the dashboard and
in ``ray list actors --detail``. Constructor arguments are pickled into the Serve
controller's checkpoint and displayed nowhere, so the launching process reads the keys
(``LLMP_API_KEY``, ``LLMP_ADMIN_KEY``, ``HF_TOKEN``, each also from a file named by the
same variable with ``_FILE`` appended, as container secrets are mounted) and hands them
to the replicas as one :class:`Secrets`, whose ``repr`` shows only which keys are set.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from llm_platform.errors import ConfigError
from llm_platform.storage import STORAGE_ENV

NAMES = ("LLMP_API_KEY", "LLMP_ADMIN_KEY", "HF_TOKEN", *STORAGE_ENV)
"""The storage variables travel the same way: replicas on other nodes reach ``s3://`` with them."""


class Secrets:
    def __init__(self, values: dict[str, str] | None = None):
        self._values = {name: value for name, value in (values or {}).items() if value}

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Secrets:
        env = os.environ if environ is None else environ
        values = {}
        for name in NAMES:
            if env.get(f"{name}_FILE"):
                path = Path(env[f"{name}_FILE"]).expanduser()
                try:
                    values[name] = path.read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
                if not values[name]:
                    raise ConfigError(f"{name}_FILE: {path} is empty")
            elif env.get(name):
                values[name] = env[name]
        return cls(values)

    def get(self, name: str) -> str | None:
        return self._values.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def bearer_matches(self, name: str, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries key ``name``, compared in constant time."""
        expected = f"Bearer {self._values[name]}".encode()
        return hmac.compare_digest((authorization or "").encode(), expected)

    def export(self, *names: str) -> None:
        """Put keys into this process's environment (e.g. HF_TOKEN for huggingface_hub and vLLM's workers)."""
        for name in names:
            if name in self._values:
                os.environ[name] = self._values[name]

    def __repr__(self) -> str:
        return f"Secrets({', '.join(sorted(self._values)) or 'none'} set; values hidden)"

"""Errors users see. Each names the thing that is wrong, so no one has to read a
library traceback to learn that a path was mistyped."""


class PlatformError(Exception):
    """Base of every error the platform raises on bad input."""


class ConfigError(PlatformError, ValueError):
    """A configuration file or override is invalid (unknown key, bad value)."""


class ModelNotFoundError(PlatformError, FileNotFoundError):
    """A model named by path or hub id cannot be found or fetched."""


class AdapterError(PlatformError, ValueError):
    """An adapter is malformed, unsafe, or does not fit its base model."""


class DataError(PlatformError, ValueError):
    """A dataset cannot be found, read, or does not have the expected columns."""


class SamplingError(PlatformError, ValueError):
    """A sampling parameter is out of range. ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message

    def __reduce__(self):  # picklable, so the error survives the trip from a Ray replica
        return SamplingError, (self.param, self.message)


class EngineUnavailableError(PlatformError, RuntimeError):
    """The inference engine died (its process crashed or was killed); the replica holding it must be replaced."""

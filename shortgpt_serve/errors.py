"""User-facing errors.

Every stage raises a subclass of :class:`ShortGPTError` for problems the user can fix; the CLI prints its
message as one line and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShortGPTError(Exception):
    """A problem the user can fix. The message names what is wrong and how to fix it, on one line."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        """The CLI flag (or config key) at fault, when there is one."""


class ConfigError(ShortGPTError):
    """A bad configuration value, in a flag, the environment or the YAML file."""


class ModelError(ShortGPTError):
    """The model cannot be found, read or handled."""


class CalibrationError(ShortGPTError):
    """The calibration text cannot be read or is too short."""


class CheckpointError(ShortGPTError):
    """The shortened checkpoint cannot be written."""


class ServeError(ShortGPTError):
    """The vLLM server cannot be started or stopped serving."""


class QualityError(ShortGPTError):
    """Evaluation data or settings are unusable (unknown task, data not installed, too few items)."""


class BudgetError(ShortGPTError):
    """The latency budget and the accuracy floor cannot both be met and the user asked for strictness."""


class CacheError(ShortGPTError):
    """The cache folder cannot be written (full, read-only, or not a folder)."""


class HealingError(ShortGPTError):
    """Healing cannot run on this model or data (a family or quantization it cannot fold into, too little text)."""

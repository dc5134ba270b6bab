"""Exception hierarchy: every error monquant raises on purpose derives from MonquantError."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "InputTypeError", "MonquantError"]


class MonquantError(Exception):
    """Base class of all deliberate monquant errors."""


class ConfigError(MonquantError, ValueError):
    """Invalid settings (model, training, solver or command-line options)."""


class DataError(MonquantError):
    """A data set is missing, corrupt or could not be downloaded."""


class CheckpointError(MonquantError):
    """A tensor/checkpoint/weight file is missing, corrupt, tampered with or in a refused format."""


class InputTypeError(MonquantError, TypeError):
    """A value of a type monquant cannot take (e.g. an object with no JSON form)."""

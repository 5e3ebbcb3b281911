"""The one exception type for user errors: bad file, bad config, bad request.

The CLI prints its message on one line and exits with `exit_code` (2 by default);
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class YunqueError(Exception):
    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(YunqueError):
    """A config file or override names an unknown key, has a wrong type or an out-of-range value."""


class CheckpointError(YunqueError):
    """A checkpoint directory is missing, unsafe (pickle), corrupt or does not match the model."""


class DataError(YunqueError):
    """Input data cannot be read or fails verification."""


class TrainingDiverged(YunqueError):
    """Training met a non-finite loss, gradient norm or weight and stopped: the last good
    checkpoint is kept and nothing is exported. Exit code 3, so that a script can tell it from
    a bad config (2) and retry with, say, a lower learning rate."""

    exit_code = 3


class MissingExtraError(YunqueError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_extra(package: str, extra: str, needed_by: str, module: str | None = None) -> MissingExtraError:
    """The one-line error for a missing optional package: `raise missing_extra(...) from None`."""
    found = f" (no module named {module!r})" if module else ""
    return MissingExtraError(
        f"{needed_by} needs the optional package {package}{found}: "
        f"pip install 'yunque[{extra}]' (in a clone: bash install.sh {extra})"
    )


def require(module: str, extra: str, needed_by: str, *, package: str | None = None) -> ModuleType:
    """Import an optional dependency (`package` on PyPI, `module` by default), or fail in one line
    naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
    raise missing_extra(package or module, extra, needed_by, missing)

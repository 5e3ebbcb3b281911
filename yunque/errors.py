"""The one exception type for user errors: bad file, bad config, bad request.

The CLI prints its message on one line and exits with `exit_code` (2 by default);
anything else that escapes is a bug and keeps its traceback.
"""


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

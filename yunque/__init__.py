"""yunque: build your own LLM end to end, on hardware you have, with security built in."""

__version__ = "0.1.0"

from yunque.errors import YunqueError  # noqa: E402  (re-exported: the one user-facing error type)

__all__ = ["YunqueError", "__version__"]

"""The user's side of relufit: configuration, the round loop, backends, reports."""

from worker import __version__

__all__ = ["__version__"]

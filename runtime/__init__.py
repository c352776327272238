"""pmnc.runtime: the supervisor, its forked workers and the CLI, built on pmnc.safe's public API."""

from .calls import CallDepthError, NotFoundError, Pmnc, RemoteError

__all__ = ["CallDepthError", "NotFoundError", "Pmnc", "RemoteError"]

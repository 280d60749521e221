"""Typed errors: what a request did wrong, and when the engine itself cannot serve.

A request's own failure (its input, its options, its constraint) is an `EFTRequestError`, a
`ValueError` that names the offending parameter, so callers and the server can tell it from
the engine's own trouble without reading the message. `EngineError` means the engine could
not finish a request for a reason of its own; `EngineUnavailableError` means it cannot serve
at all (its loop failed again and again) and every call is refused at once, never left to
hang.
"""

from __future__ import annotations

__all__ = ["EFTRequestError", "EngineError", "EngineUnavailableError"]


class EFTRequestError(ValueError):
    """A request that cannot be decoded as given; `param` names the offending parameter
    (the core's name: `weights`, `temperature`, `constraints`, `prompt`, ...) and `code` says
    what kind of problem it is where that has a name (`context_length_exceeded`)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineError(RuntimeError):
    """The engine failed while this request was in flight; the engine itself recovered, so
    the same request may be retried."""


class EngineUnavailableError(EngineError):
    """The engine cannot serve (`Engine.failure` says why): every call fails at once."""

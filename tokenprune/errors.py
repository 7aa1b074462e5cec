"""User-facing errors.

Everything a user can get wrong (an unknown name, a bad option value, a malformed spec) raises a
subclass of :class:`TokenpruneError`. The CLI turns these into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class TokenpruneError(Exception):
    """Base class of errors caused by user input; the message says the cause and the fix."""


class UnknownNameError(TokenpruneError, KeyError):
    """A pruner, model or task name that no registry knows. The message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0]) if self.args else ""


class OptionError(TokenpruneError, ValueError):
    """An option that does not exist or has a value outside what is allowed."""


class ContextOverflowError(OptionError):
    """Samples whose prompt (visual tokens included) is longer than the model's context.

    ``rows`` holds their batch indices, so a sweep can skip and record exactly those samples.
    """

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows

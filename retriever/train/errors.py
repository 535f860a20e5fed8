"""Errors of training runs that are about the run's state, not bugs: the CLI prints them as one line."""

from __future__ import annotations

from retriever.errors import UserError


class InvalidCheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be trusted (no checksum manifest, a missing, extra or changed file, or an
    unreadable progress file)."""


class NoValidCheckpointError(UserError, ValueError):
    """Every checkpoint of a run is invalid: the run cannot continue, and training from scratch over them would
    silently mix two runs."""


class NonFiniteError(UserError, ArithmeticError):
    """Training produced NaN or infinite values."""


class NonFiniteLossError(NonFiniteError):
    """A non-finite loss or gradient at a step, with `train.on_nonfinite: stop`."""


class NonFiniteWeightsError(NonFiniteError):
    """The trained weights (or the files written from them) hold non-finite values: nothing is exported."""

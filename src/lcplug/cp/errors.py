"""Errors of context parallelism: each one line naming the bad value and what would be valid."""

from __future__ import annotations

from ..errors import LcplugError


class CPError(LcplugError):
    """Base of context-parallel errors."""


class CPConfigError(CPError, ValueError):
    """A cp patch that cannot run: degree vs world size or heads, a sequence length the shard cannot split."""


class CPShapeError(CPError, ValueError):
    """Ranks of one context-parallel group disagree on the shapes of a step (caught by the shape handshake)."""


class CPCommError(CPError, RuntimeError):
    """A collective of the context-parallel group failed: a rank died, or did not answer within the timeout."""

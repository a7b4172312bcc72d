"""How a job can end other than by success. The class decides retry and what people are told."""

from __future__ import annotations


class JobRefused(Exception):
    """A job cannot start: a budget, a per-user limit or an unconfirmed draft. Nothing was rented."""


class JobFailure(Exception):
    """A classified failure. `kind` is shown to people; `retryable` marks infrastructure failures
    (instance never ready, host offline, SSH lost for good), which get one more try elsewhere."""

    retryable = False

    def __init__(self, kind: str, message: str, *, last_lines: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.last_lines = last_lines


class InfraFailure(JobFailure):
    retryable = True


class JobCancelled(Exception):
    def __init__(self, by: str = "") -> None:
        super().__init__(f"cancelled by {by}" if by else "cancelled")
        self.by = by

"""Errors of the Vast.ai client. Messages never contain the API key."""

from __future__ import annotations


class VastError(Exception):
    """Any failure talking to Vast.ai."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class VastAuthError(VastError):
    """The API key is missing, wrong or lacks a permission. Never retried."""


class OfferUnavailable(VastError):
    """The offer was taken between search and rent (no_such_ask)."""


class InsufficientCredit(VastError):
    """The account cannot pay for the rental."""


class RateLimited(VastError):
    """429 after every retry."""


class RentAmbiguous(VastError):
    """A create may or may not have rented a machine, and its label lookup found nothing yet."""


class NoOffers(VastError):
    """No offer matched the filters (or every candidate was snatched)."""

    ambiguous: bool = False  # a create went unanswered on the way: its rental may still surface


class SearchQuotaExceeded(VastError):
    """Vast.ai's daily search quota is spent (429 search_quota_exceeded): it resets at 00:00 UTC."""

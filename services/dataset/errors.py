"""The one exception family of the dataset package.

A `DatasetError` means the input was rejected outright (unsafe or unreadable archive, refused URL):
nothing about it is trusted further. Problems that a person can fix in an otherwise readable dataset
are not exceptions; they are `Problem`s in the report.
"""

from __future__ import annotations


class DatasetError(Exception):
    """Input rejected. `code` is stable (machine-readable), the message is one clear line."""

    code: str = "dataset_rejected"

    def __init__(self, code: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path  # the archive entry or URL concerned, if any

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"

    def as_problem(self) -> dict[str, str]:
        return {"code": self.code, "path": self.path, "message": self.message}


class UnsafeArchiveError(DatasetError):
    """An entry tries to escape, is a link or device, or the archive is a bomb."""


class UnreadableArchiveError(DatasetError):
    """Not a zip, corrupt, encrypted or using an unsupported compression."""


class FetchError(DatasetError):
    """URL intake refused (scheme, address, size) or failed (network, HTTP status)."""

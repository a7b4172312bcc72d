"""The QA report: what was found, what was repaired, and whether the dataset is ready to train."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field

from services.dataset.manifest import Manifest


class Severity(StrEnum):
    ERROR = "error"  # blocks training: the dataset is not ready
    WARNING = "warning"  # worth knowing, does not block


class Problem(BaseModel):
    """Something a person has to fix. `code` is stable; `path` is the name inside their upload."""

    code: str
    path: str = ""
    message: str
    severity: Severity = Severity.ERROR


class Repair(BaseModel):
    """Something the intake changed on its own, and why."""

    code: str
    path: str = ""
    message: str


class DatasetReport(BaseModel):
    ready: bool
    images: int = Field(ge=0)  # images in the cleaned dataset
    captioned: int = Field(ge=0)  # of those, with a caption of their own (.txt, json or captioner)
    filled: int = Field(default=0, ge=0)  # of those, whose caption was filled with the trigger word
    problems: list[Problem] = Field(default_factory=list)
    repairs: list[Repair] = Field(default_factory=list)
    ignored: list[str] = Field(default_factory=list)  # junk skipped (Mac metadata, hidden files)
    duplicates: int = Field(default=0, ge=0)
    trigger_word: str | None = None
    total_bytes: int = Field(default=0, ge=0)
    summary: str = ""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    def render_summary(self) -> str:
        """A few human lines: the verdict, counts, then problems and repairs grouped by code."""
        head = "ready to train" if self.ready else "not ready"
        lines = [
            f"{head}: {self.images} images, {self.captioned} captioned"
            + (f", {self.filled} filled with the trigger word" if self.filled else "")
            + (f", {self.duplicates} duplicates dropped" if self.duplicates else "")
            + (f", {len(self.ignored)} junk files ignored" if self.ignored else "")
        ]
        for title, items in (("problems", self.problems), ("repairs", self.repairs)):
            counts = Counter(i.code for i in items)
            if counts:
                lines.append(f"{title}: " + ", ".join(f"{code} x{n}" for code, n in sorted(counts.items())))
        return "\n".join(lines)


@dataclass(frozen=True)
class PreparedDataset:
    """The outcome of `prepare`: the report, the cleaned flat folder and its manifest."""

    report: DatasetReport
    folder: Path
    manifest: Manifest

"""The dataset manifest: what was packed, with a sha256 per file, so the box can verify what it got.

Shared by the packer (which writes it as `manifest.json` into the tar) and by the SSH shipper
(which checks every file's sha256 on the rented box after extraction).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, Field, field_validator

MANIFEST_NAME = "manifest.json"

# Relative POSIX paths only, made of safe characters: these paths reach a remote shell (quoted)
# and tar on the box, so the packer normalises names into this alphabet.
_SAFE_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9._\-/ ]+$")


class ManifestFile(BaseModel):
    path: str  # relative POSIX path inside the dataset folder
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not _SAFE_PATH.match(v) or "//" in v:
            raise ValueError(f"unsafe path in manifest: {v!r}")
        return v


class Manifest(BaseModel):
    version: int = 1
    files: list[ManifestFile]
    images: int = Field(ge=0)
    captions: int = Field(ge=0)
    trigger_word: str | None = None
    dataset_sha256: str = ""

    def model_post_init(self, _ctx: object) -> None:
        self.files.sort(key=lambda f: f.path)
        if not self.dataset_sha256:
            self.dataset_sha256 = self.digest()

    def digest(self) -> str:
        """sha256 over the sorted (path, size, sha256) lines: the dataset's identity."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

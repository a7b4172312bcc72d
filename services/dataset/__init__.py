"""Dataset intake and QA: safe unzip and URL fetch, image and caption checks with repairs, and a
deterministic packer with a manifest. Never imports discord; CPU work runs in threads."""

from services.dataset.errors import DatasetError, FetchError, UnreadableArchiveError, UnsafeArchiveError
from services.dataset.fetch import address_refusal, fetch_url
from services.dataset.manifest import MANIFEST_NAME, Manifest, ManifestFile
from services.dataset.pack import build_manifest, pack
from services.dataset.prepare import DATASET_DIR, Captioner, prepare, rejected_report
from services.dataset.report import DatasetReport, PreparedDataset, Problem, Repair, Severity

__all__ = [
    "DATASET_DIR",
    "MANIFEST_NAME",
    "Captioner",
    "DatasetError",
    "DatasetReport",
    "FetchError",
    "Manifest",
    "ManifestFile",
    "PreparedDataset",
    "Problem",
    "Repair",
    "Severity",
    "UnreadableArchiveError",
    "UnsafeArchiveError",
    "address_refusal",
    "build_manifest",
    "fetch_url",
    "pack",
    "prepare",
    "rejected_report",
]

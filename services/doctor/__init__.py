"""`lorabot doctor`: check every configured service with the operator's real credentials, spending nothing.

Each check is one small async function registered with `@check(name, ...)` in a sibling module
(local, vast, r2, hf, discord_api). It gets the `Doctor` (settings, shared clients, results so far)
and returns `passed(...)`, `failed(detail, fix)` or `warned(detail, fix)` (or a list of named results).
A check whose prerequisite failed is reported as not checked, so one mistake gives one fix line.
"""

import importlib

from services.doctor.core import REGISTRY, Check, CheckResult, Doctor, check, failed, passed, run_checks, warned

# importing the modules registers their checks, in the order an operator sets things up
for _module in ("local", "vast", "r2", "hf", "discord_api"):
    importlib.import_module(f"services.doctor.{_module}")

__all__ = ["REGISTRY", "Check", "CheckResult", "Doctor", "check", "failed", "passed", "run_checks", "warned"]

"""The doctor's frame: results, the check registry, the shared context and the runner."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.settings import Settings, redact

# one slow service must not hang the whole report
CHECK_TIMEOUT_S = 30.0


@dataclass
class CheckResult:
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # ok, but worth acting on (shown with "!")
    skipped: bool = False  # not run: a check it needs failed
    name: str = ""

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix, "warn": self.warn}


def passed(detail: str) -> CheckResult:
    return CheckResult(True, detail)


def failed(detail: str, fix: str) -> CheckResult:
    return CheckResult(False, detail, fix)


def warned(detail: str, fix: str) -> CheckResult:
    return CheckResult(True, detail, fix, warn=True)


CheckFn = Callable[["Doctor"], Awaitable["CheckResult | list[CheckResult]"]]


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    local: bool  # needs nothing outside this machine: `lorabot run` runs these at start
    critical: bool  # `lorabot run` refuses to start when it fails
    needs: tuple[str, ...]  # checks that must pass first


REGISTRY: list[Check] = []


def check(name: str, *, local: bool = False, critical: bool = False,
          needs: tuple[str, ...] = ()) -> Callable[[CheckFn], CheckFn]:
    """Register a check; the order of registration is the order of the report."""

    def register(fn: CheckFn) -> CheckFn:
        REGISTRY.append(Check(name, fn, local, critical, needs))
        return fn

    return register


@dataclass
class Doctor:
    """What the checks share: settings, the environment, facts found so far, clients to close."""

    settings: Settings
    # Discord permission names -> bit values the bot needs (from bot/permissions.py; services never import discord)
    required_permissions: Mapping[str, int] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    results: dict[str, CheckResult] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def secret(self, value: Any) -> str:
        return value.get_secret_value() if value is not None else ""

    def clean(self, text: str) -> str:
        return redact(text, self.settings.secret_values())


async def _run_one(doc: Doctor, c: Check) -> list[CheckResult]:
    blocked = [n for n in c.needs if n in doc.results and not doc.results[n].ok]
    if blocked:
        return [CheckResult(False, f"not checked: `{blocked[0]}` failed", f"fix `{blocked[0]}` first", skipped=True,
                            name=c.name)]
    try:
        out = await asyncio.wait_for(c.fn(doc), CHECK_TIMEOUT_S)
    except TimeoutError:
        out = failed(f"no answer within {CHECK_TIMEOUT_S:.0f} s", "check this machine's network and the service")
    except Exception as exc:  # a check never ends the report: one line, no traceback
        out = failed(doc.clean(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0][:300]),
                     "run `lorabot doctor` again; if it persists, report it with this line")
    results = out if isinstance(out, list) else [out]
    for r in results:
        r.name = r.name or c.name
        r.detail, r.fix = doc.clean(r.detail), doc.clean(r.fix)
    return results


async def run_checks(doc: Doctor, *, local_only: bool = False, select: Callable[[str], bool] | None = None,
                     on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run the registered checks in order (each sees the results before it); close what they opened.

    `select` picks checks by name (with the checks whose facts they use: vast.* need vast.key)."""
    out: list[CheckResult] = []
    async with doc.stack:
        for c in REGISTRY:
            if (local_only and not c.local) or (select is not None and not select(c.name)):
                continue
            results = await _run_one(doc, c)
            # the check's own name stands for all of its results (a per-guild check fails if one guild does)
            doc.results[c.name] = CheckResult(all(r.ok for r in results), "", name=c.name)
            for r in results:
                out.append(r)
                if on_result is not None:
                    on_result(r)
    return out


def critical_names(local_only: bool = True) -> set[str]:
    return {c.name for c in REGISTRY if c.critical and (c.local or not local_only)}

"""Late looks at a label after a create went unanswered: Vast.ai may finish such a create minutes
later, and the second machine would bill until someone noticed. Each re-check destroys every
instance under the label but the one kept (all of them once the job is over)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from services.vastai.client import VastClient
from services.vastai.errors import VastError
from services.vastai.rent import one_per_label

log = logging.getLogger(__name__)

RECHECK_DELAYS_S = (60.0, 180.0, 600.0)  # +1, +3 and +10 minutes after the rental
_tasks: set[asyncio.Task[None]] = set()  # strong references: a bare task may be garbage-collected


async def recheck_label(
    client: VastClient,
    label: str,
    keep: Callable[[], int | None],
    delays_s: Sequence[float] = RECHECK_DELAYS_S,
    on_destroyed: Callable[[list[int]], Awaitable[None]] | None = None,
) -> None:
    """At each delay (seconds after the start), destroy the label's instances other than keep()."""
    waited = 0.0
    for at in sorted(delays_s):
        await asyncio.sleep(max(0.0, at - waited))
        waited = at
        try:
            extra = await one_per_label(client, label, keep())
        except VastError as exc:
            log.warning("late check of label %s failed: %s", label, exc)
            continue
        except Exception as exc:  # the client closed with its process: nothing left to check with
            log.warning("late checks of label %s stopped: %s", label, exc)
            return
        if extra:
            log.warning("label %s: destroyed late rental(s) %s", label, extra)
            if on_destroyed is not None:
                await on_destroyed(extra)


def schedule_rechecks(
    client: VastClient,
    label: str,
    keep: Callable[[], int | None],
    delays_s: Sequence[float] = RECHECK_DELAYS_S,
    on_destroyed: Callable[[list[int]], Awaitable[None]] | None = None,
) -> asyncio.Task[None]:
    """Run recheck_label in the background (it ends with the process, or when cancelled)."""
    task = asyncio.create_task(recheck_label(client, label, keep, delays_s, on_destroyed),
                               name=f"recheck-label-{label}")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


def pending_rechecks() -> list[asyncio.Task[None]]:
    return [t for t in _tasks if not t.done()]

"""The result always arrives: finished jobs whose link never reached the owner (the channel refused
it and so did the DM, or the process died in between) are delivered again after a restart, with a
freshly presigned link; and the fresh link that /status and /link show.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from services.jobs.events import Finished
from services.jobs.model import Job, JobState

if TYPE_CHECKING:
    from bot.app import LoraBot

log = logging.getLogger(__name__)


async def fresh_link(bot: LoraBot, job: Job) -> tuple[str, float | None] | None:
    """(url, expires at) of the job's LoRA: presigned anew when R2 is configured, else the stored link
    while it is still valid; None when there is nothing to link to."""
    storage = bot.storage()
    if job.lora_key and storage is not None:
        link = await storage.link(job.lora_key, expires_s=bot.settings.link_expiry_s)
        return link.url, link.expires_at.timestamp() if link.expires_at else None
    if job.lora_url and (job.link_expires_at is None or job.link_expires_at > time.time()):
        return job.lora_url, job.link_expires_at
    return None


def _undelivered(job: Job, now: float, window_s: float) -> bool:
    return (job.state is JobState.SUCCEEDED and job.channel_id is not None and job.result_delivered_at is None
            and job.result_owed
            and bool(job.lora_key or job.lora_url) and (job.finished_at or job.updated_at) > now - window_s)


async def redeliver_results(bot: LoraBot) -> int:
    """Deliver every recent undelivered result once; returns how many reached their owner."""
    await bot.wait_until_ready()
    store = bot.store
    if store is None:
        return 0
    now = time.time()
    jobs = [j for j in await store.find(states=[JobState.SUCCEEDED], limit=500)
            if _undelivered(j, now, bot.settings.link_expiry_s)]
    delivered = 0
    for job in jobs:
        try:
            link = await fresh_link(bot, job)
            if link is None:
                continue
            ev = Finished(lora_url=link[0], link_expires_at=link[1],
                          duration_s=max(0.0, (job.finished_at or now) - (job.started_at or job.created_at)),
                          cost_usd=job.cost_so_far(), final_loss=job.loss)
            if await bot.notifier.deliver_result(job, ev) is not None:
                delivered += 1
        except Exception:
            log.exception("redelivering the result of job %s failed", job.id)
    if jobs:
        log.info("redelivered %d of %d undelivered results", delivered, len(jobs))
    return delivered

"""Budgets that hold, over the wire (issue 13): people press Confirm under real quotes in the fake
Discord; the queue never holds more than the budget, even when two press at the same moment. The
per-user intake rate (dry runs included) and the streamed attachment download, too."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.app import LoraBot
from services.jobs.model import JobState
from services.jobs.worker import Worker
from tests.bot.test_cogs_discord import answer, make_settings
from tests.services.jobs.conftest import dataset_zip
from tests.sim.discord import FakeDiscord, FakeInteraction, running_bot
from tests.sim.vast import VastEmulator

USERS = [7000 + n for n in range(10)]


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    with VastEmulator() as emu:
        yield emu
        assert emu.live_instances() == []


def budget_settings(fake: FakeDiscord, vast: VastEmulator, root: Path, sec_per_step: float) -> Any:
    # a $10 budget for the whole server; slow steps make each quote a few dollars
    return make_settings(fake, vast, root, global_daily_budget=10.0, user_daily_budget=100.0, max_job_cost=100.0,
                         sec_per_step_4090=sec_per_step)


def hold_the_queue(bot: LoraBot) -> Worker:
    """A worker that queues but is not started: nothing is rented, the queue is what is tested."""
    bot.worker = Worker(bot.require_store(), bot.settings, bot.notifier, vast_factory=bot.vast)
    return bot.worker


async def quotes(fake: FakeDiscord, users: list[int]) -> list[Any]:
    ixs = []
    for user in users:
        att = fake.add_attachment("set.zip", dataset_zip(3, 256))
        ixs.append(fake.slash("train", {"name": "cat", "trigger_word": "sks", "steps": 100},
                              attachments={"dataset": att}, user_id=user))
    msgs = [await answer(fake, ix, timeout=60) for ix in ixs]
    for msg in msgs:
        assert msg.components, msg.content
    return msgs


async def confirm_all(fake: FakeDiscord, msgs: list[Any], users: list[int]) -> list[FakeInteraction]:
    """Press every quote's Confirm at once; each quote is then edited to its outcome (queued or not)."""
    clicks = [fake.click(m.id, "lorabot:confirm", user_id=u) for m, u in zip(msgs, users, strict=True)]
    await fake.wait_for(lambda: all(outcome(fake, m).startswith(("Job `", "Not started")) for m in msgs),
                        timeout=30)
    return clicks


def outcome(fake: FakeDiscord, msg: Any) -> str:
    return str(fake.messages[msg.id].content)


async def test_ten_confirmed_jobs_cannot_queue_past_a_10_dollar_budget(fake: FakeDiscord, vast: VastEmulator,
                                                                      tmp_path: Path) -> None:
    async with running_bot(fake, budget_settings(fake, vast, tmp_path, 200.0), start_worker=False) as bot:
        hold_the_queue(bot)
        msgs = await quotes(fake, USERS)
        store = bot.require_store()
        jobs = [(await store.find(user_id=str(u)))[0] for u in USERS]
        cost = jobs[0].quote["cost_high"]
        assert 1.0 < cost < 5.0 and all(j.quote["cost_high"] == cost for j in jobs)
        await confirm_all(fake, msgs, USERS)
        states = [(await store.require(j.id)).state for j in jobs]
        fits = math.floor(10.0 / cost)
        assert states.count(JobState.QUEUED) == fits, (cost, states)
        assert states.count(JobState.QUEUED) * cost <= 10.0
        refused = [outcome(fake, m) for m, s in zip(msgs, states, strict=True) if s is not JobState.QUEUED]
        assert len(refused) == len(USERS) - fits
        assert all("server's daily budget" in text for text in refused), refused
        assert all(s is JobState.CANCELLED for s in states if s is not JobState.QUEUED)
    assert not [r for r in vast.requests if r["method"] == "PUT" and "/asks/" in r["path"]]


async def test_two_simultaneous_confirms_cannot_both_pass(fake: FakeDiscord, vast: VastEmulator,
                                                          tmp_path: Path) -> None:
    async with running_bot(fake, budget_settings(fake, vast, tmp_path, 400.0), start_worker=False) as bot:
        hold_the_queue(bot)
        users = USERS[:2]
        msgs = await quotes(fake, users)
        store = bot.require_store()
        jobs = [(await store.find(user_id=str(u)))[0] for u in users]
        assert 5.0 < jobs[0].quote["cost_high"] <= 10.0  # one fits the $10, two do not
        await confirm_all(fake, msgs, users)  # both pressed before either is answered
        states = sorted([(await store.require(j.id)).state.value for j in jobs])
        assert states == [JobState.CANCELLED.value, JobState.QUEUED.value]


async def test_the_intake_rate_counts_dry_runs_and_refuses_before_downloading(
    fake: FakeDiscord, vast: VastEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def read_whole(self: discord.Attachment, *, use_cached: bool = False) -> bytes:
        raise AssertionError("an attachment must be streamed to disk, never read into memory whole")

    monkeypatch.setattr(discord.Attachment, "read", read_whole)
    async with running_bot(fake, make_settings(fake, vast, tmp_path, train_rate=2), start_worker=False):
        for _ in range(2):
            att = fake.add_attachment("set.zip", dataset_zip(3, 256))
            ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "dry_run": True},
                            attachments={"dataset": att})
            msg = await answer(fake, ix, timeout=30)
            assert "Dry run" in msg.content
        assert len(fake.downloads) == 2
        att = fake.add_attachment("set.zip", dataset_zip(3, 256))
        ix = fake.slash("train", {"name": "cat", "trigger_word": "sks", "dry_run": True},
                        attachments={"dataset": att})
        msg = await answer(fake, ix, timeout=30)
        assert msg.ephemeral and "too many training requests" in msg.content
        assert len(fake.downloads) == 2

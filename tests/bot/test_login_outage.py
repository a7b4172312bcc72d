"""Issue 13 (H4): the worker runs before and without the Discord login. Discord refusing the token for
a long outage (compressed: hundreds of ms of backoff stand for minutes) never leaves a box undriven,
and a destroy failure reaches the operator's admin channel."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from bot.app import LoraBot
from bot.cli.run import serve
from services.jobs import JobState, JobStore
from services.jobs.events import OperatorAlert
from services.jobs.intake import draft
from services.jobs.model import Job
from services.storage import Storage
from services.vastai import VastClient
from tests.services.jobs.conftest import dataset_zip
from tests.sim.discord import FakeDiscord, running_bot
from tests.sim.world import SimWorld

S = JobState


async def test_a_job_trains_to_the_end_while_discord_refuses_the_login(world: SimWorld, tmp_path: Path) -> None:
    with FakeDiscord() as fake:
        settings = world.settings(discord_token=fake.token, discord_guild_id=fake.guild_id,
                                  discord_login_backoff_s=0.05, discord_login_backoff_max_s=0.2)
        store = await JobStore(settings.db_path).open()
        async with VastClient.from_settings(settings) as vast:
            d = await draft(store, settings, source=dataset_zip(3, 256), user_id="u", name="outage", trigger="sks",
                            overrides={"steps": 30, "save_every": 10, "sample_every": 0}, vast=vast)
        assert d.ok, d.message
        await store.transition(d.job.id, S.QUEUED, "confirmed")  # as a previous process left it
        token = fake.token
        fake.token = "reset-in-the-developer-portal"  # Discord answers the bot's token with 401 now
        undo = fake.patch_discord()
        client = LoraBot(settings, guild_ready_timeout=0.05)
        bot = asyncio.create_task(serve(settings, client))
        try:
            deadline = asyncio.get_running_loop().time() + 90
            while not (job := await store.require(d.job.id)).state.terminal:
                assert not bot.done(), bot.exception()
                assert asyncio.get_running_loop().time() < deadline, job.state
                await asyncio.sleep(0.1)
            assert job.state == S.SUCCEEDED, job.reason
            assert job.lora_key and await Storage.from_settings(settings).head(job.lora_key) is not None
            assert world.vast.live_instances() == []
            refused = [r for r in fake.requests if r["status"] == 401 and r["path"].endswith("/users/@me")]
            assert len(refused) >= 5, refused  # the login was retried all along
            assert not fake.wait_identified(0)  # and never got in while the job ran
            fake.token = token  # the operator fixed the token: the bot logs in by itself
            assert await asyncio.to_thread(fake.wait_identified, 30)
        finally:
            async with asyncio.timeout(30):
                await client.close()  # how discord.py wants to be stopped (a cancel can be swallowed)
                with contextlib.suppress(BaseException):
                    await bot
            undo()
            await store.close()


async def test_destroy_failures_reach_the_admin_channel(tmp_path: Path) -> None:
    with FakeDiscord() as fake:
        admin_channel = fake.channel_id
        from services.settings import load_settings

        settings = load_settings(discord_token=fake.token, discord_guild_id=fake.guild_id,
                                 db_path=str(tmp_path / "db.sqlite3"), admin_channel_id=admin_channel)
        async with running_bot(fake, settings, start_worker=False) as b:
            assert isinstance(b, LoraBot)
            cli_job = Job(name="cat", user_id="1001", source="cli", state=S.FAILED)  # no channel of its own
            await b.notifier.notify(cli_job, OperatorAlert("instance 7000001 of job x could not be destroyed"))
            msgs = [m for m in fake.channel_messages() if "could not be destroyed" in m.content]
            assert len(msgs) == 1 and msgs[0].channel_id == admin_channel

"""The fake Discord refuses what Discord refuses (review discord.md §6), probed with raw requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sim.discord import (
    ATTACH_FILES,
    DEFAULT_BOT_PERMISSIONS,
    EMBED_LINKS,
    SEND_MESSAGES,
    FakeDiscord,
    FakeInteraction,
)


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as f:
        yield f


@pytest.fixture
def http(fake: FakeDiscord) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.api_base, headers={"Authorization": f"Bot {fake.token}"}) as c:
        yield c


def post(http: httpx.Client, cid: int, body: dict[str, Any], files: dict[str, Any] | None = None) -> httpx.Response:
    if files:
        return http.post(f"/channels/{cid}/messages", data={"payload_json": json.dumps(body)}, files=files)
    return http.post(f"/channels/{cid}/messages", json=body)


def test_permissions_per_channel_refuse_and_show_in_interactions(fake: FakeDiscord, http: httpx.Client) -> None:
    cid = fake.channel_id
    fake.set_bot_permissions(cid, DEFAULT_BOT_PERMISSIONS & ~EMBED_LINKS & ~ATTACH_FILES)
    embed_only = post(http, cid, {"embeds": [{"title": "t"}]})
    assert embed_only.status_code == 403 and embed_only.json()["code"] == 50013
    with_file = post(http, cid, {"content": "x"}, files={"files[0]": ("a.png", b"png")})
    assert with_file.status_code == 403 and with_file.json()["code"] == 50013
    # with text, the embed is just not shown
    ok = post(http, cid, {"content": "hi", "embeds": [{"title": "t"}]})
    assert ok.status_code == 200 and ok.json()["embeds"] == []
    fake.set_bot_permissions(cid, DEFAULT_BOT_PERMISSIONS & ~SEND_MESSAGES)
    assert post(http, cid, {"content": "x"}).json()["code"] == 50013
    fake.set_bot_permissions(cid, 0)
    assert post(http, cid, {"content": "x"}).json()["code"] == 50001


def test_bodies_are_validated_with_the_field_path(fake: FakeDiscord, http: httpx.Client) -> None:
    cid = fake.channel_id
    long_title = post(http, cid, {"embeds": [{"title": "x" * 999}]})
    assert long_title.status_code == 400 and long_title.json()["code"] == 50035
    assert "title" in long_title.json()["errors"]["embeds"]["0"]
    field = post(http, cid, {"embeds": [{"fields": [{"name": "a", "value": "v" * 1500}]}]})
    assert field.json()["errors"]["embeds"]["0"]["fields"]["0"]["value"]
    assert post(http, cid, {"embeds": [{"title": "t"}] * 11}).json()["code"] == 50035
    assert post(http, cid, {}).json()["code"] == 50006
    assert post(http, cid, {"content": ""}).json()["code"] == 50006


def test_mentions_follow_allowed_mentions(fake: FakeDiscord, http: httpx.Client) -> None:
    who = "<@100000000000000001> <@!100000000000000002>"
    default = post(http, fake.channel_id, {"content": who}).json()
    assert {u["id"] for u in default["mentions"]} == {"100000000000000001", "100000000000000002"}
    none = post(http, fake.channel_id, {"content": who, "allowed_mentions": {"parse": []}}).json()
    assert none["mentions"] == []
    one = post(http, fake.channel_id, {"content": who, "allowed_mentions": {"users": ["100000000000000002"]}})
    assert [u["id"] for u in one.json()["mentions"]] == ["100000000000000002"]


def test_edits_of_an_hour_old_message_hit_30046_as_a_429(fake: FakeDiscord, http: httpx.Client) -> None:
    mid = post(http, fake.channel_id, {"content": "status"}).json()["id"]
    fake.advance(3601)
    codes = [http.patch(f"/channels/{fake.channel_id}/messages/{mid}", json={"content": f"e{i}"})
             for i in range(fake.old_edit_cap + 1)]
    assert [r.status_code for r in codes[:-1]] == [200] * fake.old_edit_cap
    assert codes[-1].status_code == 429 and codes[-1].json()["code"] == 30046


def test_threads_refuse_a_second_start_and_starting_inside_a_thread(fake: FakeDiscord, http: httpx.Client) -> None:
    mid = post(http, fake.channel_id, {"content": "status"}).json()["id"]
    first = http.post(f"/channels/{fake.channel_id}/messages/{mid}/threads", json={"name": "s"})
    assert first.status_code == 201 and first.json()["id"] == mid  # thread id = message id
    again = http.post(f"/channels/{fake.channel_id}/messages/{mid}/threads", json={"name": "s"})
    assert again.json()["code"] == 160004
    inner = post(http, int(mid), {"content": "in the thread"}).json()["id"]
    nested = http.post(f"/channels/{mid}/messages/{inner}/threads", json={"name": "x"})
    assert nested.json()["code"] == 50024
    fake.archive_thread(int(mid), locked=True)
    assert post(http, int(mid), {"content": "x"}).json()["code"] == 50083


def test_rate_limit_headers_on_success(fake: FakeDiscord, http: httpx.Client) -> None:
    r = post(http, fake.channel_id, {"content": "x"})
    assert r.headers["X-RateLimit-Limit"] and r.headers["X-RateLimit-Bucket"]
    assert int(r.headers["X-RateLimit-Remaining"]) == fake.bucket_limit - 1


def test_dm_channels_and_closed_dms(fake: FakeDiscord, http: httpx.Client) -> None:
    dm = http.post("/users/@me/channels", json={"recipient_id": "1001"}).json()
    assert dm["type"] == 1
    assert post(http, int(dm["id"]), {"content": "hello"}).status_code == 200
    assert [m.content for m in fake.dms(1001)] == ["hello"]
    fake.dm_closed.add(1001)
    assert post(http, int(dm["id"]), {"content": "again"}).json()["code"] == 50007


def test_slash_options_are_checked_against_the_synced_definition(fake: FakeDiscord, http: httpx.Client) -> None:
    defs = [{"name": "train", "description": "d", "type": 1, "options": [
        {"name": "name", "description": "d", "type": 3, "required": True, "min_length": 1, "max_length": 64},
        {"name": "steps", "description": "d", "type": 4, "min_value": 50, "max_value": 20000}]}]
    assert http.put(f"/applications/{fake.app_id}/guilds/{fake.guild_id}/commands", json=defs).status_code == 200
    with pytest.raises(ValueError, match="not a synced"):
        fake.slash("nope", {})
    with pytest.raises(ValueError, match="needs name"):
        fake.slash("train", {"steps": 100})
    with pytest.raises(ValueError, match="out of range"):
        fake.slash("train", {"name": "cat", "steps": 10})


def test_command_overwrites_are_validated_and_creates_are_capped(fake: FakeDiscord, http: httpx.Client) -> None:
    url = f"/applications/{fake.app_id}/guilds/{fake.guild_id}/commands"
    bad_order = [{"name": "train", "description": "d", "type": 1, "options": [
        {"name": "a", "description": "d", "type": 3},
        {"name": "b", "description": "d", "type": 3, "required": True}]}]
    assert http.put(url, json=bad_order).json()["code"] == 50035
    assert http.put(url, json=[{"name": "Train", "description": "d", "type": 1}]).json()["code"] == 50035
    assert http.put(url, json=[{"name": "t", "description": "x" * 101, "type": 1}]).json()["code"] == 50035
    fake.max_command_creates = 2
    assert http.put(url, json=[{"name": "a", "description": "d"}, {"name": "b", "description": "d"}]).status_code == 200
    assert http.put(url, json=[{"name": "a", "description": "d2"}]).status_code == 200  # an update, not a create
    again = http.put(url, json=[{"name": "c", "description": "d"}])
    assert again.status_code == 429 and again.json()["code"] == 30034


def test_a_public_deferral_stays_public_and_tokens_expire_on_the_fakes_clock(fake: FakeDiscord) -> None:
    # an interaction as the gateway would have delivered it (probed here without a client)
    ix = FakeInteraction(fake.snowflake(), "itoken-probe", 2, "offers", 1001, fake.channel_id, fake.now())
    fake.interactions[ix.id] = ix
    with httpx.Client(base_url=fake.api_base) as http:
        assert http.post(f"/interactions/{ix.id}/{ix.token}/callback", json={"type": 5}).status_code == 200
        again = http.post(f"/interactions/{ix.id}/{ix.token}/callback", json={"type": 5})
        assert again.json()["code"] == 40060
        hook = f"/webhooks/{fake.app_id}/{ix.token}"
        # the first followup fills the deferral and keeps its visibility: its ephemeral flag is ignored
        first = http.post(hook, json={"content": "error", "flags": 64}).json()
        assert first["flags"] & 64 == 0 and first["id"] == str(ix.original_id)
        fake.advance(15 * 60 + 1)
        late = http.patch(hook + "/messages/@original", json={"content": "late"})
        assert late.status_code == 401 and late.json()["code"] == 50027


async def test_train_rank_is_a_choice_a_client_enforces(fake: FakeDiscord, tmp_path: Path) -> None:
    from services.settings import load_settings
    from tests.sim.discord import running_bot

    s = load_settings(discord_token=fake.token, discord_guild_id=fake.guild_id, db_path=str(tmp_path / "d.db"))
    async with running_bot(fake, s, start_worker=False):
        [train] = [c for c in fake.commands[str(fake.guild_id)] if c["name"] == "train"]
        rank = next(o for o in train["options"] if o["name"] == "rank")
        assert [c["value"] for c in rank["choices"]] == [4, 8, 16, 32, 64, 128]
        lr = next(o for o in train["options"] if o["name"] == "learning_rate")
        assert lr["max_value"] == 1e-2  # FLUX LoRA rates are ~1e-4 (review L7)
        with pytest.raises(ValueError, match="choices"):
            fake.slash("train", {"name": "cat", "trigger_word": "sks", "rank": 12})

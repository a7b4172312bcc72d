"""Checks of Vast.ai: the key, the credit, the SSH key's registration, offers to rent right now."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from services.doctor.core import CheckResult, Doctor, check, failed, passed, warned
from services.quote import Quote, quote
from services.settings import Settings
from services.vastai import VastAuthError, VastClient, VastError

KEYS_URL = "https://cloud.vast.ai/manage-keys/"
# a typical first job: the default preset on 20 images of ~1.5 MB
TYPICAL_IMAGES = 20
TYPICAL_DATASET_BYTES = TYPICAL_IMAGES * 1_500_000


def typical_quote(s: Settings, *, dph_total: float, inet_down_mbps: float, gpu_name: str) -> Quote:
    """What a typical first job costs on an offer (the quote model of every /train)."""
    from services.jobs.intake import DEFAULT_PRESET
    from services.recipe import FluxRecipe

    recipe = FluxRecipe.from_preset(DEFAULT_PRESET, name="first lora", trigger_word="sks")
    return quote(recipe, dph_total=dph_total, inet_down_mbps=inet_down_mbps, dataset_bytes=TYPICAL_DATASET_BYTES,
                 gpu_name=gpu_name, settings=s, num_images=TYPICAL_IMAGES)


async def _client(doc: Doctor) -> VastClient:
    if "vast" not in doc.facts:
        doc.facts["vast"] = await doc.stack.enter_async_context(VastClient.from_settings(doc.settings))
    client: VastClient = doc.facts["vast"]
    return client


@check("vast.key")
async def api_key(doc: Doctor) -> CheckResult:
    if doc.settings.vastai_api_key is None:
        return CheckResult(False, "not checked: VASTAI_API_KEY is not set", "fix `settings` first", skipped=True)
    try:
        doc.facts["balance"] = await (await _client(doc)).balance()
    except VastAuthError:
        return failed(f"Vast.ai refused VASTAI_API_KEY (at {doc.settings.vastai_api_url})",
                      f"copy a working key from {KEYS_URL} into VASTAI_API_KEY")
    except VastError as exc:
        return failed(f"Vast.ai did not answer: {exc}", "check VASTAI_API_URL and this machine's network")
    return passed(f"the key works at {doc.settings.vastai_api_url}")


@check("vast.credit", needs=("vast.key",))
async def credit(doc: Doctor) -> CheckResult:
    s = doc.settings
    have = doc.facts["balance"].credit
    need = s.max_job_cost * s.credit_margin
    if have <= 0:
        return failed(f"credit ${have:.2f}: nothing can be rented", "add credit at https://cloud.vast.ai/billing/")
    if have < need:
        return warned(f"credit ${have:.2f}, below one job at the cap (LORABOT_MAX_JOB_COST ${s.max_job_cost:.2f} "
                      f"x {s.credit_margin:g})", "add credit at https://cloud.vast.ai/billing/")
    return passed(f"credit ${have:.2f}")


def _key_text(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("public_key") or item.get("key") or item.get("ssh_key") or "")
    return ""


@check("vast.ssh_key", needs=("vast.key", "ssh.key"))
async def ssh_key_registered(doc: Doctor) -> CheckResult:
    """Registered with the account, or registered now: lorabot would do it at the first rental anyway, and a
    key that cannot be registered (a scoped or team API key) must be found before a machine bills."""
    client = await _client(doc)
    pub_path = f"{doc.settings.ssh_key_path}.pub"
    public = (await asyncio.to_thread(Path(pub_path).read_text)).strip()
    try:
        client.check_public_key(public)
        body = await client.request("GET", "/api/v0/ssh/", "ssh")
        items = body if isinstance(body, list) else (body.get("keys") or body.get("ssh_keys") or [])
        wanted = " ".join(public.split()[:2])
        if any(" ".join(_key_text(i).split()[:2]) == wanted for i in items if isinstance(items, list)):
            return passed("the public key is registered with the account")
        await client.ensure_ssh_key(public)
    except VastError as exc:
        if exc.code == "team_ssh_keys_not_supported":
            return failed("a team API key cannot register account SSH keys",
                          f"add {pub_path} at https://cloud.vast.ai/manage-keys/ (SSH Keys), or use a personal API key")
        if exc.status in (401, 403):
            return failed(f"the API key may not read or add SSH keys ({exc})",
                          f"give the key at {KEYS_URL} permission for SSH keys, or use a full-access key")
        return failed(f"{pub_path}: {exc}", f"ssh-keygen -y -f {doc.settings.ssh_key_path} > {pub_path}")
    return passed("the public key was not registered with the account: registered it now (free)")


@check("vast.offers", needs=("vast.key",))
async def offers_now(doc: Doctor) -> CheckResult:
    from services.jobs.intake import offer_query
    from services.vastai import rank

    s = doc.settings
    q = offer_query(s)
    found = rank(await (await _client(doc)).search_offers(q))
    where = (f"{s.gpu_name} under ${s.max_price:.2f}/h, reliability >= {s.min_reliability:g}, "
             f">= {s.min_inet_down:g} Mbit/s down, CUDA >= {s.min_cuda:g}, {s.disk_gb:g} GB disk")
    if not found:
        return failed(f"no offer now matches: {where}",
                      "raise LORABOT_MAX_PRICE, or loosen LORABOT_MIN_RELIABILITY / LORABOT_MIN_INET_DOWN / "
                      "LORABOT_GPU_NAME (see `lorabot offers --max-price 2`)")
    cheapest = min(found, key=lambda o: o.dph_total)
    best = found[0]
    tq = typical_quote(s, dph_total=best.dph_total, inet_down_mbps=best.inet_down, gpu_name=best.gpu_name)
    return passed(f"{len(found)}{'+' if len(found) >= q.limit else ''} offers ({where}); cheapest "
                  f"${cheapest.dph_total:.3f}/h; a typical first job ({TYPICAL_IMAGES} images) on the best: "
                  f"{tq.summary()}")

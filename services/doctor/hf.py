"""Checks of Hugging Face through `huggingface_hub`: the token, its role, access to the gated base model.

HF_ENDPOINT (huggingface_hub's own variable) points these at another hub; the tests use tests/sim/hf.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.doctor.core import CheckResult, Doctor, check, failed, passed, warned

TOKENS_URL = "https://huggingface.co/settings/tokens"
HF_HOWTO = (
    f"make a fine-grained token at {TOKENS_URL} with \"Read access to contents of all public gated repos "
    "you can access\", and put it in HF_TOKEN")


def _api(doc: Doctor) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=doc.env.get("HF_ENDPOINT") or None)


def base_models() -> list[str]:
    """The Hugging Face repos the presets train on (FLUX.1-dev is gated: its licence must be accepted)."""
    from services.recipe import MODEL_REPOS, PRESETS

    return sorted({MODEL_REPOS[p.get("base_model", "dev")] for p in PRESETS.values()} | {MODEL_REPOS["dev"]})


@check("hf.token")
async def token(doc: Doctor) -> CheckResult:
    from huggingface_hub.errors import HfHubHTTPError

    if doc.settings.hf_token is None:
        return CheckResult(False, "not checked: HF_TOKEN is not set", "fix `settings` first", skipped=True)
    try:
        me = await asyncio.to_thread(_api(doc).whoami, token=doc.secret(doc.settings.hf_token))
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return failed("Hugging Face refused HF_TOKEN (invalid or revoked)", HF_HOWTO)
        return failed(f"Hugging Face answered HTTP {status}", "try again later; check this machine's network")
    role = str(((me.get("auth") or {}).get("accessToken") or {}).get("role") or "?")
    who = me.get("name") or "?"
    if role == "write":
        return warned(f"a write token of {who}: it goes to every rented machine, where a read token is enough",
                      HF_HOWTO)
    return passed(f"token of {who} ({role})")


@check("hf.model", needs=("hf.token",))
async def model_access(doc: Doctor) -> CheckResult:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api, tok = _api(doc), doc.secret(doc.settings.hf_token)
    for repo in base_models():
        page = f"https://huggingface.co/{repo}"
        try:
            await asyncio.to_thread(api.auth_check, repo, token=tok)
        except GatedRepoError:
            return failed(f"no access to {repo}: its licence is not accepted for this token's account (or a "
                          "fine-grained token lacks gated-repo read access)",
                          f"log in at {page}, accept the licence; {HF_HOWTO}")
        except RepositoryNotFoundError:
            return failed(f"{repo} is not visible with this token", f"open {page} while logged in; {HF_HOWTO}")
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            return failed(f"checking {repo}: HTTP {status}", "try again later")
    return passed(f"access to {', '.join(base_models())}")

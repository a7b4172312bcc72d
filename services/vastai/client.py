"""Async Vast.ai API client (httpx) that trusts nothing but what it can check.

Quirks handled here (reference/vastai-api.md): 429 with a plain-text body (jittered exponential
backoff, Retry-After when given, per-endpoint pacing at Vast's thresholds), the daily search quota
(never retried), redirects (followed only within Vast.ai), empty or `success: false` answers (errors,
never "done"), a bad key answered with 401 or with
404 + auth_error, the instance id of a rental in `new_contract`, `instances.id` or nowhere, show
wrapped in `instances` and null when gone, v1 paginated list, and a create that may have rented a
machine even though its answer was lost (never re-sent blindly: the label is looked up first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from services.settings import Settings
from services.vastai.errors import (
    InsufficientCredit,
    OfferUnavailable,
    RateLimited,
    RentAmbiguous,
    SearchQuotaExceeded,
    VastAuthError,
    VastError,
)
from services.vastai.models import Balance, Instance, InstanceStatus, Offer, strip_strings
from services.vastai.search import JobPlan, OfferQuery, rank

log = logging.getLogger(__name__)

SSH_KEY_PREFIXES = ("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-", "sk-ssh-ed25519", "sk-ecdsa-")
V1_PAGE_LIMIT = 25  # the server's maximum
CREATE_TIMEOUT_S = 120.0  # the official SDK's: "conservative enough for ... instance creation"
MAX_RETRY_AFTER_S = 60.0  # the official client's cap on a Retry-After it waits out
MAX_REDIRECTS = 3
# Minimum seconds between calls per endpoint: the x-rate-limit thresholds of Vast's OpenAPI files
# (reference §7; search is 10/minute per IP)
ENDPOINT_PACE_S = {
    "bundles": 6.0, "asks": 4.5, "show": 2.0, "list": 1.0, "manage": 1.0, "destroy": 3.0,
    "ssh": 1.0, "user": 1.0,
}
QUOTA_MESSAGE = "Vast.ai's daily search quota is used up until 00:00 UTC (search_quota_exceeded)"


class _Retryable(Exception):
    """A response or transport failure worth another try (429, 502-504, connection errors)."""

    def __init__(self, error: VastError, retry_after_s: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _is_search_quota(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error") == "search_quota_exceeded"


def in_vast_domain(host: str) -> bool:
    host = host.lower()
    return host == "vast.ai" or host.endswith(".vast.ai")


def redirect_allowed(origin: str, target: str) -> bool:
    """Follow a redirect (with the key) only to the same origin or to https *.vast.ai."""
    o, t = urlsplit(origin), urlsplit(target)
    if (t.scheme, t.hostname, t.port) == (o.scheme, o.hostname, o.port):
        return True
    return t.scheme == "https" and in_vast_domain(t.hostname or "")


def _message(response: httpx.Response) -> tuple[str, str | None]:
    """(message, error code) from a body that may or may not be JSON."""
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        return text[:300] or response.reason_phrase, None
    if isinstance(body, dict):
        code = body.get("error")
        msg = body.get("msg") or body.get("message") or body.get("detail") or code or text
        return str(msg).strip()[:300], str(code) if code else None
    return text[:300], None


def _is_auth_failure(response: httpx.Response, msg: str, code: str | None) -> bool:
    """401, or 403/404 that say auth_error / "Invalid user key" (search and v1 list answer 404)."""
    if response.status_code == 401:
        return True
    says_auth = code == "auth_error" or "invalid user key" in msg.lower()
    return response.status_code in (403, 404) and says_auth


_FATAL_CREATE_WORDS = ("credit", "billing", "balance", "payment")


def classify_create_refusal(offer_id: int, exc: VastError) -> VastError:
    """What a failed create means: the account cannot pay (fatal), the offer is taken or refused
    (try the next one), or nobody knows whether it rented (5xx, timeout, dropped connection)."""
    text = f"{exc} {exc.code or ''}".lower()
    if isinstance(exc, RateLimited):
        return exc  # nothing was rented, and no other offer would fare better right now
    if exc.code == "missing_billing" or any(w in text for w in _FATAL_CREATE_WORDS):
        return InsufficientCredit(f"Vast.ai says the account cannot pay: add credits ({exc})", status=exc.status)
    if exc.status is None or exc.status >= 500 or exc.status == 408:
        return exc  # ambiguous: the rental may have happened
    if exc.code == "invalid_image" or "image" in text:
        return VastError(f"Vast.ai refused the image: {exc}", status=exc.status, code=exc.code)
    # snatched, not available, already rented, scheduling failed (cancel_unavail), any other 4xx or a
    # 200 with success:false: this offer, not the rental, is refused
    return OfferUnavailable(f"offer {offer_id} refused: {exc}", status=exc.status, code=exc.code)


class VastClient:
    """One client per process; use as an async context manager."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://console.vast.ai",
        *,
        timeout_s: float = 30.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        min_interval_s: float = 0.25,
        create_timeout_s: float = CREATE_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise VastAuthError("VASTAI_API_KEY is empty")
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            # header only: keys in URLs end up in logs
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
        )
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._min_interval_s = min_interval_s
        self._create_timeout_s = create_timeout_s
        self._base_url = base_url.rstrip("/")
        self._pace_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._last_call: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> VastClient:
        settings.require("vastai_api_key", why="to talk to Vast.ai")
        assert settings.vastai_api_key is not None
        return cls(
            settings.vastai_api_key.get_secret_value(),
            settings.vastai_api_url,
            timeout_s=settings.vastai_timeout_s,
            max_retries=settings.vastai_max_retries,
            backoff_s=settings.vastai_backoff_s,
            backoff_max_s=settings.vastai_backoff_max_s,
            min_interval_s=settings.vastai_min_interval_s,
            create_timeout_s=settings.vastai_create_timeout_s,
            **kwargs,
        )

    async def __aenter__(self) -> VastClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport ----------------------------------------------------------------------------
    def pace_s(self, endpoint: str) -> float:
        """Seconds between two calls to `endpoint`: Vast's threshold, or none at all when the
        floor is 0 (the local emulator, which has no per-endpoint limits)."""
        if self._min_interval_s <= 0:
            return 0.0
        return max(self._min_interval_s, ENDPOINT_PACE_S.get(endpoint, 0.0))

    async def _pace(self, endpoint: str) -> None:
        """Vast.ai enforces a minimum interval per endpoint: keep to it instead of eating 429s."""
        async with self._pace_locks[endpoint]:
            wait = self._last_call.get(endpoint, 0.0) + self.pace_s(endpoint) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_call[endpoint] = time.monotonic()

    async def _once(
        self, method: str, path: str, endpoint: str, *, retry_transport: bool, **kwargs: Any
    ) -> Any:
        await self._pace(endpoint)
        url = path
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                err = VastError(f"cannot reach Vast.ai ({type(exc).__name__}) on {endpoint}")
                if retry_transport:
                    raise _Retryable(err) from exc
                raise err from exc
            if not response.is_redirect:
                break
            # a redirect is never an answer: follow it only within Vast.ai (the key goes along)
            target = urljoin(str(response.url), response.headers.get("location", ""))
            if not response.headers.get("location") or not redirect_allowed(self._base_url, target):
                raise VastError(f"Vast.ai {endpoint}: answered {response.status_code} redirect to "
                                f"{urlsplit(target).netloc or 'nowhere'}; not followed", status=response.status_code)
            url = target
            kwargs.pop("params", None)  # the Location already carries the query
        else:
            raise VastError(f"Vast.ai {endpoint}: too many redirects", status=response.status_code)
        if response.status_code == 429:
            if _is_search_quota(response):
                raise SearchQuotaExceeded(QUOTA_MESSAGE, status=429, code="search_quota_exceeded")
            raise _Retryable(RateLimited(f"Vast.ai rate limit on {endpoint}", status=429), _retry_after(response))
        if response.status_code in (502, 503, 504):
            err = VastError(f"Vast.ai {response.status_code} on {endpoint}", status=response.status_code)
            # a gateway error on a create may hide a rental: only idempotent calls are retried
            if retry_transport:
                raise _Retryable(err)
            raise err
        msg, code = _message(response)
        if _is_auth_failure(response, msg, code):
            raise VastAuthError(
                "Vast.ai rejected the API key (VASTAI_API_KEY): " + (msg or "auth error"),
                status=response.status_code,
                code=code or "auth_error",
            )
        if response.status_code >= 400:
            raise VastError(f"Vast.ai {endpoint}: {response.status_code} {msg}", status=response.status_code, code=code)
        if not response.content.strip():
            # never "nothing to report": an empty answer says nothing about what happened
            raise VastError(f"Vast.ai {endpoint}: empty answer ({response.status_code})", status=response.status_code)
        try:
            body = strip_strings(response.json())
        except ValueError as exc:
            raise VastError(f"Vast.ai {endpoint}: answer is not JSON", status=response.status_code) from exc
        if isinstance(body, dict) and body.get("success") is False:
            msg, code = _message(response)
            raise VastError(f"Vast.ai {endpoint}: {msg or 'success: false'}", status=response.status_code, code=code)
        return body

    async def request(
        self, method: str, path: str, endpoint: str, *, retry_transport: bool = True, **kwargs: Any
    ) -> Any:
        backoff = wait_random_exponential(multiplier=self._backoff_s, max=self._backoff_max_s)  # full jitter

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = exc.retry_after_s if isinstance(exc, _Retryable) else None
            # the server's Retry-After wins over our guess (capped like the official client's)
            return min(after, MAX_RETRY_AFTER_S) if after is not None else backoff(state)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self._max_retries + 1),
            wait=wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(method, path, endpoint, retry_transport=retry_transport, **kwargs)
        except _Retryable as exc:
            raise exc.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    # --- offers -------------------------------------------------------------------------------
    async def search_offers(self, query: OfferQuery, plan: JobPlan | None = None) -> list[Offer]:
        """Offers that pass the query, ranked by the expected cost of `plan` (a typical job if None)."""
        body = await self.request("POST", "/api/v0/bundles/", "bundles", json=query.to_body())
        raw = body.get("offers", []) if isinstance(body, dict) else []
        offers = []
        for item in raw if isinstance(raw, list) else []:
            try:
                offers.append(Offer.model_validate(item))
            except ValueError:
                log.warning("skipping an offer that does not parse")
        return rank([o for o in offers if query.accepts(o)], plan)

    # --- instances ----------------------------------------------------------------------------
    async def create_instance(
        self,
        offer_id: int,
        *,
        label: str,
        image: str,
        disk_gb: float,
        env: dict[str, str] | None = None,
        onstart: str | None = None,
        direct_ssh: bool = True,
    ) -> int | None:
        """PUT /asks/{id}/. Returns the instance id when the answer says it, else None.

        Never retried on a transport error or timeout: the rental may have happened. The caller
        (rent.py) looks the label up instead.
        """
        body: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "disk": float(disk_gb),
            "label": label,
            "env": env or {},
            "runtype": "ssh_direc ssh_proxy" if direct_ssh else "ssh_proxy",
            "cancel_unavail": True,  # a failed scheduling must be an error, not a stopped contract
            # no auto-tmux on non-interactive logins
            "onstart": onstart or "touch ~/.no_auto_tmux",
        }
        try:
            answer = await self.request(
                "PUT", f"/api/v0/asks/{int(offer_id)}/", "asks", json=body, retry_transport=False,
                # its own timeout: Vast may take 120 s to answer a create that does rent
                timeout=httpx.Timeout(self._create_timeout_s, connect=10.0),
            )
        except VastAuthError:
            raise
        except VastError as exc:
            raise classify_create_refusal(offer_id, exc) from None
        if not isinstance(answer, dict):
            return None
        for candidate in (answer.get("new_contract"), (answer.get("instances") or {}).get("id")
                          if isinstance(answer.get("instances"), dict) else None):
            try:
                if candidate is not None:
                    return int(candidate)
            except (TypeError, ValueError):
                continue
        return None

    async def show_instance(self, instance_id: int) -> Instance | None:
        """None when the instance is gone (the API answers `{"instances": null}`)."""
        try:
            body = await self.request("GET", f"/api/v0/instances/{int(instance_id)}/", "show",
                                      params={"owner": "me"})
        except VastError as exc:
            if exc.status == 404 and not isinstance(exc, VastAuthError):
                return None
            raise
        # gone only on an explicit `instances: null` (the official SDK's rule): any other shape is
        # an answer we do not understand, and a live machine must never be taken for a gone one
        if not isinstance(body, dict) or "instances" not in body:
            raise VastError(f"Vast.ai show {instance_id}: unexpected answer without 'instances'")
        inner = body["instances"]
        if inner is None:
            return None
        if isinstance(inner, list) and len(inner) == 1:
            inner = inner[0]
        if not isinstance(inner, dict) or not inner:
            raise VastError(f"Vast.ai show {instance_id}: unexpected 'instances' value")
        inner.setdefault("id", instance_id)
        return Instance.model_validate(inner)

    async def iter_instances(self, select_filters: dict[str, Any] | None = None) -> AsyncIterator[Instance]:
        """GET /api/v1/instances/, following next_token until it is null."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, str] = {
                "limit": str(V1_PAGE_LIMIT),
                "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            }
            if select_filters:
                params["select_filters"] = json.dumps(select_filters)
            if token:
                params["after_token"] = token
            body = await self.request("GET", "/api/v1/instances/", "list", params=params)
            for item in (body.get("instances") or []) if isinstance(body, dict) else []:
                if isinstance(item, dict) and item.get("id") is not None:
                    yield Instance.model_validate(item)
            token = body.get("next_token") if isinstance(body, dict) else None
            if not token or token in seen:  # a repeated token would loop forever
                return
            seen.add(token)

    async def list_instances(self, *, label: str | None = None) -> list[Instance]:
        filters = {"label": {"eq": label}} if label else None
        out = [i async for i in self.iter_instances(filters)]
        # the filter is re-checked here: never act on an instance because a filter was ignored
        return [i for i in out if label is None or i.label == label]

    async def find_by_label(self, label: str) -> list[Instance]:
        """Live instances under `label` (destroyed rows the list still returns are left out)."""
        return [i for i in await self.list_instances(label=label) if i.status != InstanceStatus.GONE]

    async def destroy_instance(self, instance_id: int, *, verify_timeout_s: float = 60.0) -> None:
        """DELETE, idempotent (already gone is success), then verified gone via show."""
        try:
            await self.request("DELETE", f"/api/v0/instances/{int(instance_id)}/", "destroy", json={})
        except VastError as exc:
            if isinstance(exc, VastAuthError) or exc.status not in (404, 410):
                raise
        deadline = time.monotonic() + verify_timeout_s
        delay = 0.2
        while True:
            inst = await self.show_instance(instance_id)
            if inst is None or inst.status == InstanceStatus.GONE:
                return
            if time.monotonic() > deadline:
                raise VastError(f"instance {instance_id} still exists after destroy")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            # a lost DELETE is re-sent: destroy is idempotent
            try:
                await self.request("DELETE", f"/api/v0/instances/{int(instance_id)}/", "destroy", json={})
            except VastError as exc:
                if isinstance(exc, VastAuthError) or exc.status not in (404, 410):
                    raise

    async def set_label(self, instance_id: int, label: str) -> None:
        await self.request("PUT", f"/api/v0/instances/{int(instance_id)}/", "manage", json={"label": label})

    # --- SSH keys -----------------------------------------------------------------------------
    @staticmethod
    def check_public_key(public_key: str) -> str:
        key = public_key.strip()
        if not key.startswith(SSH_KEY_PREFIXES):
            # the CLI once registered a file *path* as a key and reported success
            raise VastError("the SSH public key does not look like one (expected 'ssh-ed25519 AAAA...')")
        return key

    async def ensure_ssh_key(self, public_key: str) -> None:
        """Register the account key once (account keys reach only instances created after)."""
        key = self.check_public_key(public_key)
        body = await self.request("GET", "/api/v0/ssh/", "ssh")
        items = body if isinstance(body, list) else (body.get("keys") or body.get("ssh_keys") or [])
        wanted = " ".join(key.split()[:2])
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("deleted_at") is None:  # a deleted key is not there
                have = str(item.get("public_key") or item.get("key") or item.get("ssh_key") or "")
                if " ".join(have.split()[:2]) == wanted:
                    return
        await self.request("POST", "/api/v0/ssh/", "ssh", json={"ssh_key": key})

    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """Make sure the key is on this instance (Vast.ai rewrites authorized_keys over time)."""
        key = self.check_public_key(public_key)
        await self.request("POST", f"/api/v0/instances/{int(instance_id)}/ssh/", "ssh", json={"ssh_key": key})

    # --- account ------------------------------------------------------------------------------
    async def balance(self) -> Balance:
        # the answer also holds the api_key: only credit and balance are kept
        body = await self.request("GET", "/api/v0/users/current/", "user")
        return Balance.model_validate(body if isinstance(body, dict) else {})


__all__ = ["RentAmbiguous", "VastClient"]

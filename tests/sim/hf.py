"""A stand-in for the Hugging Face Hub endpoints `huggingface_hub` calls for `lorabot doctor`, on loopback.

Reached through HF_ENDPOINT (huggingface_hub's own variable). Speaks the Hub's wire format:
- GET /api/whoami-v2 with `Authorization: Bearer TOKEN`: the user, with `auth.accessToken.role`
  ("read", "write" or "fineGrained"); 401 for an unknown token.
- GET /api/models/{org}/{name}/auth-check: 200 with access; for a gated repo whose licence the
  token's user has not accepted, 403 with `X-Error-Code: GatedRepo` (huggingface_hub raises
  GatedRepoError); an unknown repo, 404 with `X-Error-Code: RepoNotFound`.

    with FakeHub() as hub:
        hub.add_token("hf_x", user="ann", role="fineGrained")
        hub.accept("ann", "black-forest-labs/FLUX.1-dev")
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

GATED = ("black-forest-labs/FLUX.1-dev",)
OPEN = ("black-forest-labs/FLUX.1-schnell", "ostris/FLUX.1-schnell-training-adapter")


@dataclass
class FakeHub:
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)  # token -> {"user", "role"}
    gated: set[str] = field(default_factory=lambda: set(GATED))
    public: set[str] = field(default_factory=lambda: set(OPEN))
    accepted: set[tuple[str, str]] = field(default_factory=set)  # (user, repo)
    requests: list[str] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    # --- state ----------------------------------------------------------------------------------
    def add_token(self, token: str, *, user: str = "operator", role: str = "fineGrained") -> str:
        self.tokens[token] = {"user": user, "role": role}
        return token

    def accept(self, user: str, repo: str) -> None:
        self.accepted.add((user, repo))

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        self._thread = threading.Thread(target=self._serve, name="fake-hf", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Hugging Face Hub did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_get("/api/whoami-v2", self._whoami)
        app.router.add_get("/api/models/{org}/{name}/auth-check", self._auth_check)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        loop.run_forever()
        loop.close()

    # --- handlers -------------------------------------------------------------------------------
    def _user(self, request: web.Request) -> dict[str, str] | None:
        auth = request.headers.get("Authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    @staticmethod
    def _error(status: int, message: str, code: str | None = None) -> web.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return web.json_response({"error": message}, status=status, headers=headers)

    async def _whoami(self, request: web.Request) -> web.Response:
        self.requests.append("whoami")
        who = self._user(request)
        if who is None:
            return self._error(401, "Invalid credentials in Authorization header")
        body: dict[str, Any] = {
            "type": "user", "id": "6" * 24, "name": who["user"], "fullname": who["user"].title(),
            "email": f"{who['user']}@example.com", "emailVerified": True, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "lorabot", "role": who["role"]}},
        }
        return web.json_response(body)

    async def _auth_check(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append(f"auth-check {repo}")
        who = self._user(request)
        if repo in self.public:
            return web.json_response({})
        if repo not in self.gated:
            return self._error(404, "Repository not found", "RepoNotFound")
        if who is None:
            return self._error(401, "Access to this model requires authentication", "GatedRepo")
        if (who["user"], repo) not in self.accepted:
            return self._error(403, f"Access to model {repo} is restricted and you are not in the authorized list. "
                               f"Visit https://huggingface.co/{repo} to ask for access.", "GatedRepo")
        return web.json_response({})

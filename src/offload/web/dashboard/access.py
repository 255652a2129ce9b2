"""Who may open the dashboard, and proof that an action came from one of its own pages.

Access is one of:
- `BasicAuth` / `BearerAuth` credentials (compared in constant time);
- an `authorize(request, action)` callable of the app's, like the admin API's;
- nothing configured: callers on this machine only, and only on a server bound to loopback.
  A dashboard reachable from elsewhere must be given credentials (`offload serve` refuses to
  start on such a bind; any other server gets a 403 page saying what to set).

Every action is a POST carrying a CSRF token: the double-submit pattern. The token is a random
cookie (`HttpOnly`, `SameSite=Strict`, scoped to the mount path) that the page also writes
into each form; a POST whose form token differs from its cookie is refused. Another site can
make the browser send the cookie (and Basic credentials) but can neither read it nor set it,
so it cannot forge the form field. No server secret is needed, so any number of API
processes accept each other's pages.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from offload.core.credentials import BasicAuth, BearerAuth

Action = Literal["read", "cancel", "replay", "discard", "purge", "schedule", "queue"]
Authorize = Callable[[Request, Action], bool | Awaitable[bool]]
DashboardAuth = BasicAuth | BearerAuth | Authorize | tuple[BasicAuth | BearerAuth, ...]
"""What `jobs.dashboard(auth=...)` takes: credentials (one kind or several), or a callable."""

CSRF_COOKIE = "offload_csrf"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Refusal:
    """Why a request may not see the page: the status to answer and what to tell the user."""

    status: int
    message: str
    challenge: str | None = None  #: a WWW-Authenticate value, for 401


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Access:
    """Decides each request (`refusal()`), and checks actions' CSRF tokens."""

    def __init__(self, auth: DashboardAuth | None) -> None:
        self.credentials: tuple[BasicAuth | BearerAuth, ...] = ()
        self.authorize: Authorize | None = None
        if isinstance(auth, BasicAuth | BearerAuth):
            self.credentials = (auth,)
        elif isinstance(auth, tuple):
            self.credentials = auth
        elif auth is not None:
            self.authorize = auth

    @property
    def needs_loopback(self) -> bool:
        """True when nothing was configured: the page is for this machine only."""
        return not self.credentials and self.authorize is None

    async def refusal(self, request: Request, action: Action) -> Refusal | None:
        """None if `request` may do `action`, else why not."""
        if self.credentials:
            return None if self._presents_credentials(request) else self._challenge()
        if self.authorize is not None:
            verdict = self.authorize(request, action)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            return None if verdict else Refusal(403, f"You may not {action} here.")
        server = request.scope.get("server") or (None, None)
        client = request.client.host if request.client else None
        # The Host header too: a page of another site whose name was re-pointed at 127.0.0.1
        # (DNS rebinding) reaches a loopback socket, but names its own host.
        host = request.url.hostname
        if _is_loopback(server[0]) and _is_loopback(client) and _is_loopback(host):
            return None
        return Refusal(
            403,
            "This dashboard has no credentials, so it answers only on a loopback address. "
            "Set OFFLOAD_DASHBOARD_PASSWORD (HTTP Basic, user OFFLOAD_DASHBOARD_USERNAME) or "
            "OFFLOAD_DASHBOARD_TOKEN, or pass jobs.dashboard(auth=...).",
        )

    def _presents_credentials(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        for known in self.credentials:
            if isinstance(known, BearerAuth) and scheme == "bearer":
                if hmac.compare_digest(value.strip().encode(), known.token.encode()):
                    return True
            elif isinstance(known, BasicAuth) and scheme == "basic":
                try:
                    user, _, password = base64.b64decode(value, validate=True).partition(b":")
                except (binascii.Error, ValueError):
                    return False
                same_user = hmac.compare_digest(user, known.username.encode())
                same_password = hmac.compare_digest(password, known.password.encode())
                if same_user and same_password:
                    return True
        return False

    def _challenge(self) -> Refusal:
        basic = any(isinstance(known, BasicAuth) for known in self.credentials)
        return Refusal(
            401,
            "Sign in to see this page.",
            challenge='Basic realm="offload", charset="UTF-8"' if basic else "Bearer",
        )


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and True if it is new (the response must set the cookie)."""
    known = request.cookies.get(CSRF_COOKIE, "")
    if len(known) >= 32:
        return known, False
    return secrets.token_urlsafe(32), True


def csrf_refusal(request: Request, submitted: str | None) -> Refusal | None:
    """None if the form's token matches the cookie's (and the browser says the request is not
    from another site), else why the action is refused."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return Refusal(403, "This action came from another site; it was refused.")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if (
        len(cookie) < 32
        or not submitted
        or not hmac.compare_digest(cookie.encode(), submitted.encode())
    ):
        return Refusal(
            403,
            "This form's security token is missing or out of date: reload the page and try again.",
        )
    return None

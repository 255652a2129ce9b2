"""Credentials an operator page asks for (the dashboard): HTTP Basic or a bearer token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic: the browser asks once and sends them with every request."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username or not self.password:
            raise ValueError("BasicAuth needs a username without ':' and a non-empty password")


@dataclass(frozen=True)
class BearerAuth:
    """`Authorization: Bearer <token>`, for a proxy or a script in front of the page."""

    token: str = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("a bearer token must be at least 16 characters")

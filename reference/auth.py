"""Users: argon2 password hashes and JWTs (HS256, one hour). Endpoints take
`user: CurrentUser`; a missing, bad or expired token is a 401."""

from __future__ import annotations

import time
from typing import Annotated

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reference.config import jwt_secret

TOKEN_TTL_S = 3600
_hasher = PasswordHasher()
_bearer = HTTPBearer(auto_error=False)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except VerificationError:
        return False


def issue_token(user_id: int) -> str:
    issued = int(time.time())
    claims = {"sub": str(user_id), "iat": issued, "exp": issued + TOKEN_TTL_S}
    return jwt.encode(claims, jwt_secret(), algorithm="HS256")


def user_of(token: str) -> int | None:
    """The user a token names, or None for a bad or expired one."""
    try:
        claims = jwt.decode(token, jwt_secret(), algorithms=["HS256"], options={"require": ["exp"]})
        return int(claims["sub"])
    except (jwt.PyJWTError, KeyError, ValueError):
        return None


def current_user(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> int:
    user = user_of(credentials.credentials) if credentials else None
    if user is None:
        raise HTTPException(
            401,
            "sign in first: POST /login, then send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


CurrentUser = Annotated[int, Depends(current_user)]

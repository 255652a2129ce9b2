"""The reference service plus `POST /bench/bare-signup`: the user creation alone (argon2 hash,
insert, JWT) with none of the four inline tasks. `bench/reference_load.py` compares the two."""

from __future__ import annotations

from reference.main import Credentials, SignedIn, _create_user, app
from reference.tasks import jobs
from starlette.concurrency import run_in_threadpool

from reference import auth

__all__ = ["app", "jobs"]


@app.post("/bench/bare-signup", status_code=201)
async def bare_signup(body: Credentials) -> SignedIn:
    user_id = await run_in_threadpool(_create_user, body.email, body.password)
    assert user_id is not None, "the benchmark signs up fresh emails only"
    return SignedIn(user_id=user_id, token=auth.issue_token(user_id))

"""README "The inline lane": your own start-up and shut-down around offload's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from offload import Offload

jobs = Offload()
EVENTS: list[str] = []


@jobs.task(lane="inline")
async def warm_cache() -> None:
    EVENTS.append("cache warmed")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    EVENTS.append("database pool opened")
    async with jobs.lifespan(app):  # the inline lane runs inside your lifespan
        await warm_cache.defer()  # outside a request: starts at once
        yield
    # offload has drained its inline runs by here; close what they used
    EVENTS.append("database pool closed")


app = FastAPI(lifespan=lifespan)

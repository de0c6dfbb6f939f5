"""Writes that run to their end even when whoever asked for them is cancelled.

aiosqlite runs a statement it was handed whatever happens to the caller,
so a transaction abandoned half way would stay open.  A shielded write
finishes; its caller, if cancelled meanwhile, simply does not hear of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["shielded"]

T = TypeVar("T")


async def shielded(work: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # When the caller was cancelled, nobody awaits the task any more, and
    # asyncio would report its failure as never retrieved.  The failure is
    # already handled where it happened (rows put back, a change refused).
    if not task.cancelled():
        task.exception()

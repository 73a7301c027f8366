"""Database reads off the event loop: the gateway's only path to PostgreSQL.

The gateway queries the database only on cache misses (a key's or balance's first use, a
routing-table reload). Each read runs in a worker thread and hands its connection back (to
psycopg's pool) as soon as it is done, so no connection stays pinned to an idle thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connection

P = ParamSpec("P")
R = TypeVar("R")


def off_loop(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """``fn`` as an awaitable that runs in a worker thread and releases its connection."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return sync_to_async(run, thread_sensitive=False)

"""Database reads off the event loop: the gateway's only path to PostgreSQL.

The gateway queries the database only on cache misses (a key's or balance's first use, a
routing-table reload). Each read runs in a worker thread and hands its connection back (to
psycopg's pool) as soon as it is done, so no connection stays pinned to an idle thread.

When PostgreSQL is away a read waits for the pool's timeout before it fails. So after one
failure to reach the database, reads fail at once for ``GATEWAY_DB_RETRY_SECONDS`` and the
callers serve what they have cached, instead of every cache refresh waiting that long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, connection

P = ParamSpec("P")
R = TypeVar("R")


class _Outage:
    """Until when reads are not tried (monotonic seconds); shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.until = 0.0

    def check(self) -> None:
        if self.until and time.monotonic() < self.until:
            raise OperationalError("the database is unreachable; retrying shortly")

    def failed(self) -> None:
        with self._lock:
            self.until = time.monotonic() + settings.GATEWAY_DB_RETRY_SECONDS

    def recovered(self) -> None:
        self.until = 0.0


outage = _Outage()


def off_loop(fn: Callable[P, R], *, probe: bool = False) -> Callable[P, Awaitable[R]]:
    """``fn`` as an awaitable that runs in a worker thread and releases its connection.

    A ``probe`` (the readiness check) always tries the database, and its success ends the
    quiet period early.
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if not probe:
            outage.check()
        try:
            result = fn(*args, **kwargs)
        except OperationalError:
            outage.failed()
            raise
        finally:
            connection.close()
        outage.recovered()
        return result

    return sync_to_async(run, thread_sensitive=False)

"""Settings the gateway reads on every request, as plain attributes.

A read of ``django.conf.settings`` goes through ``LazyObject.__getattribute__`` (about a
microsecond; ten of them per request were 2 % of the gateway's CPU). ``hot.NAME`` reads a
setting once and keeps it; Django's ``setting_changed`` signal (``override_settings``, the
test ``settings`` fixture) forgets every kept value, so an override is seen at once.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed


class HotSettings:
    def __getattr__(self, name: str) -> Any:  # only when not kept yet
        if not name.isupper():
            raise AttributeError(name)
        value = getattr(settings, name)
        self.__dict__[name] = value
        return value

    def forget(self, **_signal: Any) -> None:
        self.__dict__.clear()


hot = HotSettings()
setting_changed.connect(hot.forget, dispatch_uid="routing.gateway.conf.hot")

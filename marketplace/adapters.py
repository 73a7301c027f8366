"""allauth hooks: the client IP its rate limits count by is the one the gateway uses."""

from __future__ import annotations

from allauth.account.adapter import DefaultAccountAdapter
from django.http import HttpRequest

from marketplace.client_ip import client_ip


class AccountAdapter(DefaultAccountAdapter):
    def get_client_ip(self, request: HttpRequest) -> str:
        return client_ip(request.META.get("REMOTE_ADDR"), request.headers.get("x-forwarded-for"))

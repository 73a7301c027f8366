"""ASGI entry point: the gateway beside Django.

``/v1/...`` (and ``/mcp``, the MCP server of the tools) goes to the lean gateway
(routing.gateway), which never enters Django's request machinery; WebSockets go to
Channels; everything else is Django.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

import django

django.setup()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

from marketplace.live.routing import websocket_urlpatterns  # noqa: E402
from routing.gateway.app import GatewayApp  # noqa: E402

GATEWAY_PATHS = frozenset({"/readyz", "/metrics", "/mcp"})


def build_application(gateway: GatewayApp | None = None):  # type: ignore[no-untyped-def]
    """The process's ASGI app; tests build one per test with a fresh gateway."""
    gateway_app = gateway or GatewayApp()
    # /static/ is served by the app itself (the pages' CSS and JS are small); a deployment
    # may put collectstatic's output behind its proxy instead.
    django_app = ASGIStaticFilesHandler(get_asgi_application())
    # Live dashboards (/ws/...): the session user, and only pages of our own hosts may
    # open a socket (a cross-site page would otherwise ride on the visitor's cookie).
    websocket_app = ProtocolTypeRouter(
        {
            "websocket": AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            )
        }
    )

    async def application(scope, receive, send):  # type: ignore[no-untyped-def]
        kind = scope["type"]
        if kind == "http" and (scope["path"].startswith("/v1/") or scope["path"] in GATEWAY_PATHS):
            await gateway_app(scope, receive, send)
        elif kind == "http":
            await django_app(scope, receive, send)
        elif kind == "websocket":
            await websocket_app(scope, receive, send)
        elif kind == "lifespan":
            await gateway_app.lifespan(scope, receive, send)

    application.gateway = gateway_app  # type: ignore[attr-defined]
    return application


application = build_application()

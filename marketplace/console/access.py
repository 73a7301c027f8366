"""Who may open a console page: members of the organisation in the URL, by role."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest
from django.http.response import HttpResponseBase

from marketplace.models import Membership, Organization
from marketplace.selectors import membership_for, role_allows, role_permissions


class AuthenticatedHttpRequest(HttpRequest):
    """A request of a signed-in user (what ``login_required`` views receive)."""

    user: User


@dataclass(frozen=True)
class OrgContext:
    membership: Membership
    can: dict[str, bool]

    @property
    def organization(self) -> Organization:
        return self.membership.organization

    @property
    def role(self) -> str:
        return self.membership.role


def org_view(permission: str) -> Callable[[Callable[..., HttpResponseBase]], Callable[..., Any]]:
    """Resolve ``org_slug`` to the signed-in user's membership (404 for a stranger, so an
    organisation's existence is not revealed) and require ``permission`` (403)."""

    def decorator(view: Callable[..., HttpResponseBase]) -> Callable[..., Any]:
        @login_required
        @wraps(view)
        def wrapper(
            request: AuthenticatedHttpRequest, org_slug: str, *args: Any, **kwargs: Any
        ) -> HttpResponseBase:
            membership = membership_for(user=request.user, slug=org_slug)
            if membership is None:
                raise Http404("No such organisation")
            if not role_allows(membership.role, permission):
                raise PermissionDenied(
                    f"Your role ({membership.get_role_display()}) "
                    "does not give access to this page."
                )
            ctx = OrgContext(membership=membership, can=role_permissions(membership.role))
            return view(request, ctx, *args, **kwargs)

        return wrapper

    return decorator


def org_template_context(ctx: OrgContext, **extra: Any) -> dict[str, Any]:
    return {"org": ctx.organization, "membership": ctx.membership, "can": ctx.can, **extra}

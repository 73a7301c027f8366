"""Billing's HTTP endpoints: Stripe webhooks and the Checkout return page. Thin by design."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from billing import stripe_gateway
from billing.errors import PaymentProviderError
from billing.models import StripeEvent, TopUp
from billing.topups import topup_fulfil
from billing.webhooks import stripe_event_receive

logger = logging.getLogger("switchyard.billing.webhooks")


def _receive(request: HttpRequest, source: str) -> HttpResponse:
    # The signature covers the raw bytes: verify them before parsing or storing anything.
    try:
        event = stripe_gateway.webhook_event(
            request.body,
            request.headers.get("Stripe-Signature"),
            stripe_gateway.webhook_secret(source),
        )
    except stripe_gateway.WebhookSignatureError as exc:
        logger.warning("refused a %s webhook: %s", source, exc)
        return JsonResponse({"error": {"message": "invalid signature"}}, status=400)
    stored, created = stripe_event_receive(event=event, source=source)
    return JsonResponse({"received": True, "duplicate": not created, "status": stored.status})


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> HttpResponse:
    """Platform events: Checkout (top-ups) and invoices."""
    return _receive(request, StripeEvent.Source.PLATFORM)


@csrf_exempt
@require_POST
def stripe_connect_webhook(request: HttpRequest) -> HttpResponse:
    """Connect events from vendors' connected accounts (``account.updated``)."""
    return _receive(request, StripeEvent.Source.CONNECT)


@login_required
@require_GET
def topup_return(request: HttpRequest) -> HttpResponse:
    """Stripe Checkout's success URL: ``?session_id={CHECKOUT_SESSION_ID}[&next=/path]``.

    Credits the top-up if Stripe says it is paid (the webhook may not have arrived yet);
    shows nothing about a session the user's organisations do not own.
    """
    target = request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = "/"
    session_id = request.GET.get("session_id", "")
    user_id = int(request.user.pk or 0)  # login_required: always a real user here
    owned = TopUp.objects.filter(
        stripe_session_id=session_id, organization__memberships__user_id=user_id
    ).exists()
    if session_id and owned:
        try:
            topup = topup_fulfil(session_id=session_id)
        except PaymentProviderError:
            topup = None
        if topup is not None and topup.status == TopUp.Status.PAID:
            messages.success(request, "Thank you: your credit has been added.")
        else:
            messages.info(request, "Your payment is being processed; credit follows shortly.")
    return HttpResponseRedirect(target)

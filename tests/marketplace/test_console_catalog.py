"""The public catalog: approved public endpoints with prices, context, quality and uptime."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests import factories
from vendors.models import EndpointQuality, HealthCheck

pytestmark = pytest.mark.django_db


def test_it_lists_approved_public_endpoints_with_quality_and_uptime(client, upstream):
    sql = factories.endpoint(
        base_url=upstream.base_url,
        tags=("sql", "chat"),
        price_input_usd="0.25",
        context_length=8192,
    )
    EndpointQuality.objects.create(endpoint=sql, tag="*", score=0.87)
    HealthCheck.objects.create(endpoint=sql, ok=True)
    HealthCheck.objects.create(endpoint=sql, ok=True)
    HealthCheck.objects.create(endpoint=sql, ok=False)
    hidden = factories.endpoint(base_url=upstream.base_url, approved=False, slug="not-yet")
    private = factories.endpoint(
        base_url=upstream.base_url, slug="in-house", private_to=factories.organization()
    )

    response = client.get(reverse("catalog"))

    page = response.content.decode()
    assert response.status_code == 200
    assert sql.full_slug in page and "$0.2500" in page and "8,192" in page
    assert "0.87" in page and "66.7 %" in page
    assert hidden.full_slug not in page and private.full_slug not in page
    assert "?tag=sql" in page


def test_it_filters_by_tag(client, upstream):
    sql = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    chat = factories.endpoint(base_url=upstream.base_url, tags=("chat",))
    page = client.get(reverse("catalog") + "?tag=sql").content.decode()
    assert sql.full_slug in page and chat.full_slug not in page


def test_it_says_when_nothing_is_approved(client):
    assert "No approved endpoint" in client.get(reverse("catalog")).content.decode()

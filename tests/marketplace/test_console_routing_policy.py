"""The organisation's routing policy: the console page (owners and admins) and its service."""

from __future__ import annotations

import orjson
import pytest
from django.urls import reverse

from marketplace.data_policy import MAX_ROUTING_DEFAULTS_BYTES, organization_routing_defaults_update
from marketplace.models import AuditLogEntry, Membership, Organization
from marketplace.services import ServiceError, console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Routing Co")
    client.force_login(user)
    client.user, client.org = user, org
    return client


def test_it_saves_a_policy_and_shows_it_again(owner):
    url = reverse("console:routing-policy", args=[owner.org.slug])
    assert "Default provider policy (JSON)" in owner.get(url).content.decode()
    policy = {"ignore": ["acme"], "max_price": {"completion": 6}, "data_collection": "deny"}

    response = owner.post(url, {"provider": orjson.dumps(policy).decode()})

    assert response.status_code == 302
    assert Organization.objects.get(pk=owner.org.pk).routing_defaults == policy
    entry = AuditLogEntry.objects.get(action="organization.routing_defaults_update")
    assert entry.details["routing_defaults"] == {"from": {}, "to": policy}
    page = owner.get(url).content.decode()
    assert "&quot;ignore&quot;" in page and "&quot;acme&quot;" in page  # pretty-printed JSON


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"ignore": ["acme"]', "This is not valid JSON"),
        ('["acme"]', "The policy is a JSON object"),
        ('{"sort": "cascade"}', "provider.sort` must be one of"),
        ('{"ignroe": ["acme"]}', "Unknown field `provider.ignroe`"),
        ('{"max_price": {"completion": -1}}', "provider.max_price"),
    ],
)
def test_it_refuses_a_policy_a_request_could_not_carry_and_keeps_the_old_one(owner, text, message):
    organization_routing_defaults_update(
        actor=owner.user, organization=owner.org, provider={"sort": "price"}
    )
    url = reverse("console:routing-policy", args=[owner.org.slug])

    page = owner.post(url, {"provider": text}).content.decode()

    assert message in page.replace("&#x27;", "'")
    assert Organization.objects.get(pk=owner.org.pk).routing_defaults == {"sort": "price"}


def test_an_empty_field_clears_the_policy(owner):
    organization_routing_defaults_update(
        actor=owner.user, organization=owner.org, provider={"ignore": ["acme"]}
    )
    url = reverse("console:routing-policy", args=[owner.org.slug])
    assert owner.post(url, {"provider": "  "}).status_code == 302
    assert Organization.objects.get(pk=owner.org.pk).routing_defaults == {}


def test_the_service_refuses_an_oversized_policy():
    user = factories.user()
    org = console_organization_create(actor=user, name="Big Co")
    huge = {"ignore": [f"vendor-{n:05d}" for n in range(MAX_ROUTING_DEFAULTS_BYTES // 10)]}
    with pytest.raises(ServiceError, match="larger than"):
        organization_routing_defaults_update(actor=user, organization=org, provider=huge)
    assert Organization.objects.get(pk=org.pk).routing_defaults == {}


def test_a_developer_cannot_change_it(client):  # type: ignore[no-untyped-def]
    boss, dev = factories.user(), factories.user()
    org = console_organization_create(actor=boss, name="Dev Routing Co")
    Membership.objects.create(organization=org, user=dev, role=Membership.Role.DEVELOPER)
    client.force_login(dev)
    url = reverse("console:routing-policy", args=[org.slug])
    assert client.post(url, {"provider": '{"ignore": ["x"]}'}).status_code == 403
    with pytest.raises(ServiceError):
        organization_routing_defaults_update(actor=dev, organization=org, provider={})
    assert Organization.objects.get(pk=org.pk).routing_defaults == {}

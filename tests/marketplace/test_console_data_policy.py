"""The console's privacy and cache page (owners and admins), and the usage page's cache
hits, savings and redaction counts."""

from __future__ import annotations

import itertools

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import UsageRecord
from marketplace.data_policy import api_key_data_policy_update
from marketplace.models import ApiKey, AuditLogEntry, Membership, Organization
from marketplace.services import console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)


@pytest.fixture
def owner(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Private Co")
    client.force_login(user)
    client.user, client.org = user, org
    return client


def test_it_saves_the_privacy_policy_and_cache_defaults(owner):
    url = reverse("console:data-policy", args=[owner.org.slug])
    page = owner.get(url).content.decode()
    assert '<label for="id_cache_ttl"' in page and "Personal data in prompts" in page

    response = owner.post(
        url,
        {
            "privacy_policy": "redact",
            "trusted_regions": "EU, us-east eu",
            "cache_ttl": "600",
            "cache_similarity": "0.92",
        },
    )

    assert response.status_code == 302
    org = Organization.objects.get(pk=owner.org.pk)
    assert (org.privacy_policy, org.cache_ttl, org.cache_similarity) == ("redact", 600, 920)
    assert org.trusted_regions == "eu,us-east"
    assert AuditLogEntry.objects.filter(action="organization.data_policy_update").exists()


def test_it_refuses_a_similarity_out_of_range(owner):
    url = reverse("console:data-policy", args=[owner.org.slug])
    response = owner.post(
        url, {"privacy_policy": "off", "cache_ttl": "60", "cache_similarity": "0.2"}
    )
    assert response.status_code == 200
    assert Organization.objects.get(pk=owner.org.pk).cache_similarity is None


def test_it_refuses_a_region_that_is_not_a_code(owner):
    url = reverse("console:data-policy", args=[owner.org.slug])
    data = {"privacy_policy": "trusted_only", "trusted_regions": "eu; drop", "cache_ttl": "0"}
    page = owner.post(url, data).content.decode()
    assert "Not a region code: eu;" in page
    assert Organization.objects.get(pk=owner.org.pk).privacy_policy == "off"


def test_a_developer_cannot_change_it(client):  # type: ignore[no-untyped-def]
    boss, dev = factories.user(), factories.user()
    org = console_organization_create(actor=boss, name="Dev Co")
    Membership.objects.create(organization=org, user=dev, role=Membership.Role.DEVELOPER)
    client.force_login(dev)
    url = reverse("console:data-policy", args=[org.slug])
    assert client.post(url, {"privacy_policy": "off", "cache_ttl": "0"}).status_code == 403


def _record(org, **fields):  # type: ignore[no-untyped-def]
    return UsageRecord.objects.create(
        request_id=f"guard-{next(_ids)}",
        organization=org,
        model_requested="tag:chat",
        price_input=0,
        price_output=0,
        outcome="success",
        occurred_at=timezone.now(),
        **fields,
    )


def test_the_usage_page_counts_cache_hits_savings_and_redactions(owner):
    _record(owner.org, cache="exact", cache_saved=2_500_000)
    _record(owner.org, cache="semantic", cache_saved=500_000)
    _record(owner.org, cost=10, privacy_action="redacted", privacy_found=3, privacy_kinds="EMAIL")
    _record(owner.org, cost=10, privacy_action="trusted_only", privacy_found=1)
    _record(factories.organization(), cache="exact", cache_saved=9_000_000_000)

    page = owner.get(reverse("console:usage", args=[owner.org.slug])).content.decode()

    hits = page.split('data-testid="usage-cache-hits">')[1].split("</dd>")[0]
    assert hits.startswith("2 ") and "1 semantic" in hits
    saved = page.split('data-testid="usage-cache-saved">')[1].split("</dd>")[0]
    assert saved == "$0.003000"
    redacted = page.split('data-testid="usage-redacted">')[1].split("</dd>")[0]
    assert redacted.startswith("1 ") and "3 items" in redacted
    assert "(response cache, semantic)" in page and "(no endpoint answered)" in page
    assert page.split('data-testid="usage-trusted">')[1].startswith("1<")


def test_an_owner_overrides_the_settings_of_one_key(owner):
    from marketplace.services import api_key_create

    key = api_key_create(organization=owner.org, name="batch").api_key
    url = reverse("console:key-data-policy", args=[owner.org.slug, key.pk])
    assert "As the organisation" in owner.get(url).content.decode()

    response = owner.post(
        url, {"privacy_policy": "trusted_only", "cache_ttl": "", "cache_similarity": ""}
    )

    assert response.status_code == 302
    key = ApiKey.objects.get(pk=key.pk)
    assert (key.privacy_policy, key.cache_ttl, key.cache_similarity) == ("trusted_only", None, None)
    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert "privacy: send prompts with personal data only to trusted endpoints" in listing


def test_an_owner_opts_a_key_in_to_keeping_prompts_and_completions(owner):
    from marketplace.services import api_key_create

    key = api_key_create(organization=owner.org, name="debugging").api_key
    url = reverse("console:key-data-policy", args=[owner.org.slug, key.pk])
    assert "Keep prompts and completions in this key" in owner.get(url).content.decode()
    assert ApiKey.objects.get(pk=key.pk).log_content is False  # off unless asked

    response = owner.post(url, {"privacy_policy": "", "log_content": "on"})

    assert response.status_code == 302 and ApiKey.objects.get(pk=key.pk).log_content is True
    entry = AuditLogEntry.objects.filter(action="api_key.data_policy_update").latest("pk")
    assert entry.details["log_content"] is True
    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert "keeps prompts and completions in its traces" in listing
    # A caller that changes only the privacy settings leaves it on...
    api_key_data_policy_update(
        actor=owner.user,
        api_key=ApiKey.objects.get(pk=key.pk),
        privacy_policy="redact",
        cache_ttl=None,
        cache_similarity=None,
    )
    assert ApiKey.objects.get(pk=key.pk).log_content is True
    owner.post(url, {"privacy_policy": ""})  # ...an unticked box turns it off again
    assert ApiKey.objects.get(pk=key.pk).log_content is False


def test_a_developer_cannot_override_a_key(client):  # type: ignore[no-untyped-def]
    from marketplace.services import api_key_create

    boss, dev = factories.user(), factories.user()
    org = console_organization_create(actor=boss, name="Dev Key Co")
    Membership.objects.create(organization=org, user=dev, role=Membership.Role.DEVELOPER)
    key = api_key_create(organization=org, name="k").api_key
    client.force_login(dev)
    url = reverse("console:key-data-policy", args=[org.slug, key.pk])
    assert client.post(url, {"privacy_policy": "off"}).status_code == 403
    listing = client.get(reverse("console:keys", args=[org.slug])).content.decode()
    assert "Privacy &amp; cache" not in listing

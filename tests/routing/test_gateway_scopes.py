"""API key scopes, through the real gateway: a key with scopes is refused (403
``insufficient_scope``) on any other API before a vendor is called; no scopes: every API."""

from __future__ import annotations

import pytest

from marketplace.services import ServiceError, api_key_create
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def _key(organization, scopes):  # type: ignore[no-untyped-def]
    return api_key_create(organization=organization, name="scoped", scopes=scopes).plaintext


def test_it_refuses_an_api_outside_the_keys_scopes_before_any_vendor_is_called(
    gateway_server, upstream
):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    org = factories.organization()
    key = _key(org, ["embeddings"])

    with gateway_server.client(key) as client:
        chat = client.post("/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug})
        models = client.get("/v1/models")
        trace = client.get("/v1/generation", params={"id": "gen-x"})
        feedback = client.post("/v1/feedback", json={"id": "gen-x", "score": 1})

    for response in (chat, models, trace, feedback):
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_scope"
        assert error["type"] == "permission_error"
    assert "`chat`" in chat.json()["error"]["message"]
    assert upstream.stats()["total"] == 0


def test_it_serves_the_apis_within_the_keys_scopes(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    org = factories.organization()
    key = _key(org, ["chat", "generation"])

    with gateway_server.client(key) as client:
        chat = client.post("/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug})
        assert chat.status_code == 200, chat.text
        trace = client.get("/v1/generation", params={"id": chat.json()["id"]})
        embeddings = client.post("/v1/embeddings", json={"model": endpoint.full_slug, "input": "x"})

    assert trace.status_code == 200, trace.text
    assert trace.json()["data"]["served_by"] == endpoint.full_slug
    assert embeddings.status_code == 403
    assert embeddings.json()["error"]["code"] == "insufficient_scope"


def test_a_key_without_scopes_may_use_every_api(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        chat = client.post("/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug})
        models = client.get("/v1/models")
    assert chat.status_code == 200, chat.text
    assert models.status_code == 200


def test_it_refuses_to_create_a_key_with_an_unknown_scope():
    org = factories.organization(credit_usd=None)
    with pytest.raises(ServiceError, match="unknown scope 'admin'"):
        _key(org, ["chat", "admin"])
    assert not org.api_keys.exists()


def test_tools_mcp_and_orchestration_need_the_tools_scope(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    org = factories.organization()
    key = _key(org, ["chat"])

    with gateway_server.client(key) as client:
        listed = client.get("/v1/tools")
        called = client.post("/v1/tools/sql", json={"arguments": {"input": "count users"}})
        mcp = client.post(
            "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"},
        )
        orchestrated = client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "orchestrate", "orchestrator": {"model": "tag:sql"}},
        )

    for response in (listed, called, mcp, orchestrated):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "insufficient_scope"
        assert "`tools`" in response.json()["error"]["message"]
    assert upstream.stats()["total"] == 0

"""The router: a pure function from (snapshot, request, live state) to ordered candidates.

It does no I/O, so it is cheap to call on every request and easy to test and time.
This first version resolves the model name and orders the endpoints that serve it by
quoted price; the routing-engine issue grows it (filters, scores, exploration).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from routing.errors import BadRequest, NotFound
from routing.snapshot import EndpointView, Snapshot
from vendors.pricing import quote, surge_multiplier

TAG_PREFIX = "tag:"


@dataclass(frozen=True, slots=True)
class Candidate:
    endpoint: EndpointView
    price_input: int  # quoted nanos per million tokens
    price_output: int
    multiplier: float


def resolve_model(
    snapshot: Snapshot, model: str, organization_id: int, kind: str
) -> list[EndpointView]:
    """The endpoints that could serve ``model`` for this organisation (not yet filtered)."""
    if model.startswith(TAG_PREFIX):
        wanted = [t for t in model[len(TAG_PREFIX) :].split("+") if t]
        if not wanted:
            raise BadRequest("`tag:` needs at least one capability tag", param="model")
        pool = snapshot.by_tag.get(wanted[0], ())
        found = [e for e in pool if all(t in e.tags for t in wanted[1:])]
    else:
        endpoint = snapshot.by_slug.get(model)
        found = [endpoint] if endpoint is not None else []
    visible = [e for e in found if e.visible_to(organization_id) and e.kind == kind]
    if not visible:
        raise NotFound(
            f"the model `{model}` does not exist or you do not have access to it", param="model"
        )
    return visible


def route(
    snapshot: Snapshot,
    *,
    model: str,
    organization_id: int,
    kind: str = "chat",
    utilisation: Mapping[int, float] | None = None,
) -> list[Candidate]:
    """Order the candidates for one request: cheapest quoted output price first."""
    load = utilisation or {}
    candidates = []
    for endpoint in resolve_model(snapshot, model, organization_id, kind):
        multiplier = surge_multiplier(
            endpoint.surge_curve, load.get(endpoint.id, 0.0), endpoint.surge_cap
        )
        candidates.append(
            Candidate(
                endpoint=endpoint,
                price_input=quote(endpoint.price_input, multiplier),
                price_output=quote(endpoint.price_output, multiplier),
                multiplier=multiplier,
            )
        )
    candidates.sort(key=lambda c: (c.price_output + c.price_input, c.endpoint.id))
    return candidates

"""The routing table: an immutable in-memory projection of routable endpoints.

The gateway builds it from the database when it starts and whenever the control plane
announces a change (``marketplace.invalidation``); requests read it without any I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from vendors.crypto import decrypt_secret
from vendors.models import Endpoint
from vendors.selectors import routable_endpoints

# What an OpenAI-compatible chat server (vLLM, llama.cpp, Ollama, TGI) accepts out of the box;
# an endpoint that supports more (tools, response_format) declares it.
DEFAULT_SUPPORTED_PARAMETERS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream",
        "presence_penalty",
        "frequency_penalty",
    }
)


@dataclass(frozen=True, slots=True)
class EndpointView:
    id: int
    vendor_id: int
    vendor_slug: str
    slug: str
    kind: str
    base_url: str
    upstream_model: str
    secret: str
    tags: frozenset[str]
    price_input: int
    price_output: int
    context_length: int
    capacity: int
    surge_curve: tuple[tuple[float, float], ...]
    surge_cap: float
    region: str
    data_retention_days: int
    private_to: int | None
    version: int = 1
    # Measured quality per capability tag, 0..1 ("*" = overall); empty until probed.
    quality: Mapping[str, float] = field(default_factory=dict, hash=False)
    supported_parameters: frozenset[str] = DEFAULT_SUPPORTED_PARAMETERS
    languages: tuple[str, ...] = ()  # what the vendor declares (tool descriptions)

    @property
    def full_slug(self) -> str:
        return f"{self.vendor_slug}/{self.slug}"

    def visible_to(self, organization_id: int) -> bool:
        return self.private_to is None or self.private_to == organization_id


@dataclass(frozen=True, slots=True)
class TagView:
    """A capability tag as the platform describes it (the tool catalog's source)."""

    slug: str
    name: str
    kind: str  # "task" | "domain"
    description: str = ""


@dataclass(frozen=True)
class Snapshot:
    endpoints: tuple[EndpointView, ...]
    by_slug: dict[str, EndpointView] = field(default_factory=dict)
    by_tag: dict[str, tuple[EndpointView, ...]] = field(default_factory=dict)
    # The tags routable endpoints carry; a tag missing here is described by its slug alone.
    tags: dict[str, TagView] = field(default_factory=dict)

    @classmethod
    def build(
        cls, endpoints: list[EndpointView], tags: Mapping[str, TagView] | None = None
    ) -> Snapshot:
        by_tag: dict[str, list[EndpointView]] = defaultdict(list)
        for endpoint in endpoints:
            for tag in endpoint.tags:
                by_tag[tag].append(endpoint)
        return cls(
            endpoints=tuple(endpoints),
            by_slug={e.full_slug: e for e in endpoints},
            by_tag={tag: tuple(items) for tag, items in by_tag.items()},
            tags=dict(tags or {}),
        )


def endpoint_view(endpoint: Endpoint, quality: Mapping[str, float] | None = None) -> EndpointView:
    return EndpointView(
        id=endpoint.pk,
        vendor_id=endpoint.vendor_id,
        vendor_slug=endpoint.vendor.slug,
        slug=endpoint.slug,
        kind=endpoint.kind,
        base_url=endpoint.base_url.rstrip("/"),
        upstream_model=endpoint.upstream_model,
        secret=decrypt_secret(endpoint.secret_encrypted),
        tags=frozenset(tag.slug for tag in endpoint.tags.all()),
        price_input=endpoint.price_input,
        price_output=endpoint.price_output,
        context_length=endpoint.context_length,
        capacity=endpoint.capacity,
        # Numbers already (vendors.pricing.validate_surge_curve refuses anything else).
        surge_curve=tuple((u, m) for u, m in endpoint.surge_curve),
        surge_cap=endpoint.surge_cap,
        region=endpoint.region,
        data_retention_days=endpoint.data_retention_days,
        private_to=endpoint.private_to_id,
        version=endpoint.version,
        quality=dict(quality or {}),
        languages=tuple(str(language) for language in endpoint.languages or ()),
    )


def load_snapshot() -> Snapshot:
    """Read every routable endpoint and its quality scores (four queries) into a snapshot."""
    from vendors.selectors import quality_map

    endpoints = list(routable_endpoints())
    scores = quality_map(e.pk for e in endpoints)
    # The endpoints' tags are prefetched whole: their descriptions cost no extra query.
    tags = {
        tag.slug: TagView(slug=tag.slug, name=tag.name, kind=tag.kind, description=tag.description)
        for endpoint in endpoints
        for tag in endpoint.tags.all()
    }
    return Snapshot.build([endpoint_view(e, scores.get(e.pk)) for e in endpoints], tags)

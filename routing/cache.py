"""Response cache: reuse an answer for a repeated (or, opt-in, a paraphrased) request.

Opt-in per key (``ApiKey.cache_ttl`` over ``Organization.cache_ttl``) or per request
(``"cache": {"ttl": 600, "semantic": 0.92}``; ``"cache": false`` turns it off). Every
entry lives under its organisation's prefix in Redis (``sy:cache:<org>:...``): a lookup
never reads another organisation's keys.

``ttl`` is how long an answer is kept and, for a request, the oldest answer it accepts.

* **Exact**: the key is a SHA-256 of the normalised routing policy and the normalised
  request (everything but transport fields: ``stream``, ``stream_options``, ``user``,
  ``session_id``, ``cache``, ``metadata``). Only deterministic requests are cached:
  ``temperature`` 0, or a ``seed``, or no ``temperature`` at all when the request itself
  asked for the cache (the caller said a reused answer is what it wants); ``n`` above 1
  never is.
* **Semantic** (a similarity threshold set): the request without its last user message
  names a *partition*; the last user message is embedded with the MiniLM encoder that
  auto-routing already loads, and the cached answer of the most similar earlier prompt in
  the partition is reused when its cosine similarity reaches the threshold. At most
  ``GATEWAY_CACHE_SEMANTIC_ENTRIES`` entries per organisation (the oldest go first).

A lookup is one Redis round trip (``GET`` the exact key and, with a threshold, ``HGETALL``
the partition's vectors); a semantic hit adds one ``GET``. The prompt is embedded only when
the partition holds vectors. A hit pays no vendor and is free for the customer (see
docs/design.md); it is metered as a usage event with ``cache`` and ``saved``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
import redis.asyncio as aioredis

from routing.errors import BadRequest
from routing.policy import RoutePolicy

#: Request fields that change how an answer is delivered, not what it says.
TRANSPORT_FIELDS: Final = frozenset(
    {"stream", "stream_options", "user", "session_id", "cache", "metadata", "store"}
)
_CACHE_OPTIONS: Final = frozenset({"ttl", "semantic"})


def _prefix(organization_id: int) -> str:
    return f"sy:cache:{organization_id}"


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """One request's cache settings, resolved from the key's defaults and the body."""

    ttl: int
    similarity: int | None  # cosine x 1000; None: exact only
    explicit: bool  # the request itself asked for the cache


def cache_request(
    body: dict[str, Any], *, default_ttl: int, default_similarity: int | None, max_ttl: int
) -> CacheRequest | None:
    """The request's cache settings, or None when it is not to be cached at all."""
    value = body.get("cache")
    if value is None:
        if default_ttl <= 0:
            return None
        return CacheRequest(min(default_ttl, max_ttl), default_similarity, explicit=False)
    if value is False:
        return None
    if not isinstance(value, dict):
        raise BadRequest(
            '`cache` must be an object like {"ttl": 600} or false',
            param="cache",
            code="invalid_type",
        )
    unknown = set(value) - _CACHE_OPTIONS
    if unknown:
        raise BadRequest(
            f"unknown `cache` option(s): {', '.join(sorted(map(str, unknown)))}",
            param="cache",
            code="invalid_value",
        )
    ttl = value.get("ttl", default_ttl or max_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= max_ttl:
        raise BadRequest(
            f"`cache.ttl` must be a whole number of seconds from 0 to {max_ttl}",
            param="cache.ttl",
            code="invalid_value",
        )
    similarity = default_similarity
    if "semantic" in value:
        semantic = value["semantic"]
        if semantic is False or semantic is None:
            similarity = None
        elif isinstance(semantic, bool) or not isinstance(semantic, int | float):
            raise BadRequest(
                "`cache.semantic` must be a similarity from 0.5 to 1 (or false)",
                param="cache.semantic",
                code="invalid_type",
            )
        elif not 0.5 <= semantic <= 1:
            raise BadRequest(
                "`cache.semantic` must be a similarity from 0.5 to 1",
                param="cache.semantic",
                code="invalid_value",
            )
        else:
            similarity = round(semantic * 1000)
    if ttl == 0:
        return None
    return CacheRequest(ttl, similarity, explicit=True)


def deterministic(body: dict[str, Any], *, explicit: bool) -> bool:
    """Whether a request's answer may be reused (see the module docstring)."""
    n = body.get("n")
    if n is not None and n != 1:
        return False
    temperature = body.get("temperature")
    if temperature is None:
        return explicit or isinstance(body.get("seed"), int)
    return temperature == 0 or isinstance(body.get("seed"), int)


def _material(body: dict[str, Any]) -> dict[str, Any]:
    material = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS and v is not None}
    if "max_completion_tokens" in material and "max_tokens" not in material:
        material["max_tokens"] = material.pop("max_completion_tokens")
    if material.get("temperature") == 0:
        material["temperature"] = 0  # 0 and 0.0 are one request
    return material


def _digest(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _last_user_text(messages: Any) -> tuple[int, str] | None:
    """(index, text) of the last message when it is a user message with text."""
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return len(messages) - 1, content
    if isinstance(content, list):
        texts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        if len(texts) == len(content) and texts:
            return len(messages) - 1, "\n".join(texts)
    return None


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """Where one request's answer is looked up and stored."""

    organization_id: int
    exact: str
    partition: str | None  # semantic partition (hash of vectors); None: exact only
    prompt: str  # the text embedded for the semantic cache ("" without a partition)

    @classmethod
    def for_request(
        cls, organization_id: int, policy: RoutePolicy, body: dict[str, Any], semantic: bool
    ) -> CacheKeys:
        material = _material(body)
        trace = policy.to_trace()
        prefix = _prefix(organization_id)
        exact = f"{prefix}:x:{_digest(trace, material)}"
        partition, prompt = None, ""
        last = _last_user_text(material.get("messages")) if semantic else None
        if last is not None:
            index, prompt = last
            context = dict(material)
            context["messages"] = material["messages"][:index]
            partition = f"{prefix}:s:{_digest(trace, context)}"
        return cls(organization_id, exact, partition, prompt)


@dataclass
class CacheHit:
    kind: str  # "exact" | "semantic"
    entry: dict[str, Any]
    similarity: int | None = None  # cosine x 1000 for a semantic hit


# Stores a semantic entry and keeps the organisation's entries bounded, atomically.
_SEMANTIC_STORE = """
local index, partition, answer_key = KEYS[1], KEYS[2], KEYS[3]
local entry, vector, answer, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now, max_entries, prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
redis.call('HSET', partition, entry, vector)
redis.call('EXPIRE', partition, ttl)
redis.call('SET', answer_key, answer, 'EX', ttl)
redis.call('ZADD', index, now, partition .. '|' .. entry)
redis.call('EXPIRE', index, ttl)
local excess = redis.call('ZCARD', index) - max_entries
if excess > 0 then
  for _, member in ipairs(redis.call('ZRANGE', index, 0, excess - 1)) do
    local cut = string.find(member, '|', 1, true)
    local old_partition, old_entry = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
    redis.call('HDEL', old_partition, old_entry)
    redis.call('DEL', prefix .. ':sa:' .. old_entry)
  end
  redis.call('ZREMRANGEBYRANK', index, 0, excess - 1)
end
return 1
"""


async def embed(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The prompt's unit vector (MiniLM, on a worker thread; loaded once per process)."""
    from routing.auto import get_encoder

    def run() -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.asarray(get_encoder().encode([text])[0], dtype=np.float32)

    return await asyncio.to_thread(run)


class ResponseCache:
    """Lookups and stores in Redis, namespaced by organisation."""

    def __init__(self, client: aioredis.Redis, *, semantic_entries: int) -> None:
        self.client = client
        self.semantic_entries = semantic_entries
        self._store = client.register_script(_SEMANTIC_STORE)

    async def lookup(
        self, keys: CacheKeys, request: CacheRequest
    ) -> tuple[CacheHit | None, np.ndarray[Any, np.dtype[np.float32]] | None]:
        """A hit, or None and the prompt's vector when it was computed (reused to store)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys.exact)
        if keys.partition is not None:
            pipe.hgetall(keys.partition)
        results = await pipe.execute()
        oldest = time.time_ns() // 1_000_000 - request.ttl * 1000
        if results[0] is not None:
            entry = orjson.loads(results[0])
            # A request's ttl is also the oldest answer it accepts.
            if int(entry.get("at") or 0) >= oldest:
                return CacheHit("exact", entry), None
        vectors: dict[bytes, bytes] = results[1] if keys.partition is not None else {}
        if not vectors or request.similarity is None:
            return None, None
        vector = await embed(keys.prompt)
        names = list(vectors)
        matrix = np.frombuffer(b"".join(vectors[n] for n in names), dtype=np.float32).reshape(
            len(names), -1
        )
        if matrix.shape[1] != vector.shape[0]:
            return None, vector
        scores = matrix @ vector
        best = int(np.argmax(scores))
        similarity = int(scores[best] * 1000)
        if similarity < request.similarity:
            return None, vector
        raw = await self.client.get(f"{_prefix(keys.organization_id)}:sa:{names[best].decode()}")
        if raw is None:
            return None, vector
        entry = orjson.loads(raw)
        if int(entry.get("at") or 0) < oldest:
            return None, vector
        return CacheHit("semantic", entry, similarity), vector

    async def store(
        self,
        keys: CacheKeys,
        request: CacheRequest,
        entry: dict[str, Any],
        vector: np.ndarray[Any, np.dtype[np.float32]] | None,
    ) -> None:
        """Keep an answer for ``request.ttl`` seconds (exact, and semantic when asked)."""
        raw = orjson.dumps(entry)
        await self.client.set(keys.exact, raw, ex=request.ttl)
        if keys.partition is None or request.similarity is None:
            return
        if vector is None:
            vector = await embed(keys.prompt)
        name = uuid.uuid4().hex
        prefix = _prefix(keys.organization_id)
        await self._store(
            keys=[f"{prefix}:sidx", keys.partition, f"{prefix}:sa:{name}"],
            args=[
                name,
                vector.astype(np.float32).tobytes(),
                raw,
                request.ttl,
                time.time_ns() // 1_000_000,
                self.semantic_entries,
                prefix,
            ],
        )

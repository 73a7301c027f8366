"""``Idempotency-Key`` for ``POST /v1/chat/completions`` and ``/v1/embeddings``.

The first request with a key runs and its answer is stored in Redis for 24 hours; a replay
with the same key and the same body gets the stored answer (header
``idempotent-replayed: true``) and is not charged again; a replay while the first is still
running gets 409 (a replica that died mid-request frees the key after
``RUNNING_TTL_SECONDS``, longer than any request may run); the same key with a different
body gets 422. Keys are per organisation.
Answers that invite a retry (402, 409, 429, 5xx) are not kept, so the retry can run.
Nothing is stored for requests that do not send the header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from routing.errors import GatewayError
from routing.gateway.http import Send

TTL_SECONDS = 24 * 3600
# Longer than any request may run (the gateway's deadline, an orchestration's 300 s ceiling).
RUNNING_TTL_SECONDS = 360
MAX_KEY_LENGTH = 255
MAX_STORED_BYTES = 4 * 1024 * 1024
NOT_KEPT = frozenset({402, 409, 429})

_BEGIN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'state', 'running', 'fp', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then return {'mismatch'} end
if state == 'running' then return {'running'} end
return {'done', redis.call('HGET', KEYS[1], 'response')}
"""


class IdempotencyConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_in_progress"


class IdempotencyMismatch(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class InvalidIdempotencyKey(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_idempotency_key"


def storage_key(organization_id: int, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"sy:idem:{organization_id}:{digest}"


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters"
        )
    return key


@dataclass
class Recorder:
    """Wraps ``send`` to keep a copy of the response for replays."""

    send: Send
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            self.size += len(body)
            if self.size <= MAX_STORED_BYTES:
                self.chunks.append(body)
            if not message.get("more_body"):
                self.complete = True
        await self.send(message)

    def stored(self) -> bytes | None:
        if not self.complete or self.size > MAX_STORED_BYTES:
            return None
        return orjson.dumps(
            {
                "status": self.status,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
                "body": b"".join(self.chunks).decode("utf-8", "surrogateescape"),
            }
        )


class Idempotency:
    def __init__(self, client: aioredis.Redis, *, running_ttl: int = RUNNING_TTL_SECONDS) -> None:
        """``running_ttl``: how long a request is taken to be still running. A request
        cannot run longer than its deadline, so past that a key whose replica died mid-request
        is free again instead of answering 409 for a day."""
        self._client = client
        self._running_ttl = running_ttl
        self._begin = client.register_script(_BEGIN)

    async def begin(self, organization_id: int, key: str, body: bytes) -> bytes | None:
        """None: run the request; bytes: the stored answer to replay. Raises on conflicts."""
        fingerprint = hashlib.sha256(body).hexdigest()
        result = await self._begin(
            keys=[storage_key(organization_id, key)],
            args=[fingerprint, TTL_SECONDS, self._running_ttl],
        )
        state = result[0].decode() if isinstance(result[0], bytes) else result[0]
        if state == "new":
            return None
        if state == "mismatch":
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request body")
        if state == "running":
            raise IdempotencyConflict(
                "a request with this Idempotency-Key is still running; retry later",
                headers={"retry-after": "1"},
            )
        stored: bytes = result[1]
        return stored

    async def finish(self, organization_id: int, key: str, recorder: Recorder) -> None:
        name = storage_key(organization_id, key)
        stored = recorder.stored()
        if stored is None or recorder.status in NOT_KEPT or recorder.status >= 500:
            await self._client.delete(name)
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(name, mapping={"state": "done", "response": stored})
        pipe.expire(name, TTL_SECONDS)
        await pipe.execute()

    async def abandon(self, organization_id: int, key: str) -> None:
        await self._client.delete(storage_key(organization_id, key))


async def replay(send: Send, stored: bytes) -> None:
    response = orjson.loads(stored)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response["headers"]]
    headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": response["status"], "headers": headers})
    await send(
        {"type": "http.response.body", "body": response["body"].encode("utf-8", "surrogateescape")}
    )

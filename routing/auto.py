"""Auto-routing (``model: "auto"``): choose a capability tag for a prompt.

A nearest-centroid classifier over sentence embeddings (all-MiniLM-L6-v2, int8 ONNX, run
in-process by ``vendors.reference.embeddings.MiniLMEncoder``):

- Each tag has example prompts: the platform's (``CapabilityTag.examples``, filled from
  ``vendors/examples/default_tags.json`` by ``manage.py load_tag_examples``) plus those the
  vendors of approved, public endpoints declare (``Endpoint.tag_examples``) for tags their
  endpoint carries. Every example is embedded once; a tag's centroid is the L2-normalised
  mean of its examples' unit vectors.
- A prompt is embedded and compared to every centroid by cosine similarity; the scores
  are the softmax of the similarities divided by a temperature (0.05), and the confidence
  is the top score. Below ``threshold`` (default 0.5) the classifier does not trust itself
  and answers the general tag (``general``) with ``fallback_used=True``.

Measured with the shipped examples (6 tags x 10): 35 of 36 held-out clear prompts land on
the right tag, all with confidence >= 0.5 and 29 with >= 0.8 (the miss, "How do options
work?", scored 0.34 and so falls back to ``general``); "hello there, how's it going"
scores 0.42 and falls back.

**What is classified**: the text of the *last user message* only (text parts of a
multi-part content joined), not the system prompt. System prompts are mostly boilerplate
shared by every kind of task ("You are a helpful assistant ..."); prepending one cost 2 of
36 held-out prompts and lowered every confidence. In a conversation the latest user turn
is what is being answered now. Without a user message, the last message with text is used.

**Long prompts** keep their head and their tail (``HEAD_CHARS`` + ``TAIL_CHARS``): the
tokenizer truncates at 256 tokens anyway, and instructions sit at either end ("Translate
into French: <text>", "<document> Summarise the above").

**Cost**: the model (~0.5 s to load, ~200 MB resident with onnxruntime; embedding the
60 shipped examples takes ~0.3 s more) is loaded lazily, once per process, on the first
classifier built: importing this module loads nothing (not even onnxruntime), so a gateway
worker that never sees ``auto`` never pays for it. One intra-op thread: a prompt takes
~5 ms and the gateway's other requests keep the remaining core.
``classify_async`` runs the encoder on a worker thread so the event loop is never blocked.

The gateway's use (build on the first ``auto`` request, under an ``asyncio.Lock`` so
concurrent first requests build once; on a routing-table change, refresh only if built)::

    if policy.auto:
        if self.classifier is None:                   # first auto request of this process
            self.classifier = await asyncio.to_thread(classifier_from_db)
        result = await self.classifier.classify_async(prompt_text(body["messages"]))
        policy = policy.with_auto_tags(result.tag)    # model "auto" -> "tag:<result.tag>"
        trace["auto"] = result.to_trace()
    # on invalidation: if self.classifier is not None:
    #     self.classifier = await asyncio.to_thread(classifier_from_db, previous=self.classifier)
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import orjson

# Limits on what a vendor's ``tag_examples`` may add (per endpoint and tag, and per
# example): shared with the vendor portal, which checks them when examples are declared.
from vendors.tag_examples import MAX_EXAMPLE_CHARS, MAX_VENDOR_EXAMPLES_PER_TAG

if TYPE_CHECKING:  # the real import is deferred: it loads onnxruntime
    from vendors.reference.embeddings import MiniLMEncoder

__all__ = [
    "DEFAULT_THRESHOLD",
    "GENERAL_TAG",
    "MAX_EXAMPLE_CHARS",
    "MAX_VENDOR_EXAMPLES_PER_TAG",
    "TEMPERATURE",
    "Classification",
    "TagClassifier",
    "classifier_from_db",
    "encoder_loaded",
    "examples_fingerprint",
    "get_encoder",
    "prompt_text",
    "tag_examples_from_db",
]

#: Softmax temperature over cosine similarities: clear prompts score >= ~0.6, ambiguous
#: ones ~0.4-0.5 (measured on the shipped examples).
TEMPERATURE: Final = 0.05
#: Below this confidence the classifier falls back to the general tag.
DEFAULT_THRESHOLD: Final = 0.5
#: The tag a prompt goes to when no specialised tag is a confident match.
GENERAL_TAG: Final = "general"
#: onnxruntime intra-op threads for the in-process encoder.
ENCODER_THREADS: Final = 1
#: Characters kept from the head and the tail of a long prompt (256 tokens is about 1000
#: characters of English; the tokenizer truncates the rest).
HEAD_CHARS: Final = 700
TAIL_CHARS: Final = 300

FloatArray = npt.NDArray[np.float32]


class Encoder(Protocol):
    """What the classifier needs of a sentence encoder: unit-length rows, one per text."""

    def encode(self, texts: Sequence[str]) -> FloatArray: ...


# --- the encoder: loaded once per process, on first use -----------------------------------

_encoder: MiniLMEncoder | None = None
_encoder_lock = threading.Lock()


def get_encoder() -> MiniLMEncoder:
    """The process-wide MiniLM encoder, loaded (about 0.5 s) on the first call only.

    Thread-safe: concurrent first calls load the model once.
    """
    global _encoder
    encoder = _encoder
    if encoder is None:
        with _encoder_lock:
            encoder = _encoder
            if encoder is None:
                from vendors.reference.embeddings import MiniLMEncoder

                encoder = MiniLMEncoder(threads=ENCODER_THREADS)
                encoder.encode(["warm up"])  # the first run allocates onnxruntime's buffers
                _encoder = encoder
    return encoder


def encoder_loaded() -> bool:
    """Whether this process has loaded the encoder (for metrics and tests)."""
    return _encoder is not None


# --- what to classify ---------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(parts)
    return ""


def _shorten(text: str) -> str:
    text = text.strip()
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return f"{text[:HEAD_CHARS]} ... {text[-TAIL_CHARS:]}"


def prompt_text(messages: Any) -> str:
    """The text auto-routing classifies: the last user message (see the module docstring).

    Falls back to the last message of any role that has text; ``""`` when there is none.
    Long texts keep their first ``HEAD_CHARS`` and last ``TAIL_CHARS`` characters.
    """
    if not isinstance(messages, list):
        return ""
    dicts = [m for m in messages if isinstance(m, dict)]
    for wanted_user in (True, False):
        for message in reversed(dicts):
            if wanted_user and message.get("role") != "user":
                continue
            text = _content_text(message.get("content")).strip()
            if text:
                return _shorten(text)
    return ""


# --- the classifier -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Classification:
    """The classifier's answer for one prompt.

    ``tag`` is the tag to route by: ``predicted`` (the best-scoring tag) when its
    ``confidence`` reaches the threshold, else the general tag with ``fallback_used``.
    ``scores`` are the softmax probabilities of every tag (they sum to 1).
    """

    tag: str
    confidence: float
    scores: dict[str, float]
    fallback_used: bool
    predicted: str | None = None
    threshold: float = DEFAULT_THRESHOLD

    def to_trace(self) -> dict[str, Any]:
        """JSON-serialisable data for the route trace (the top scores, rounded)."""
        top = sorted(self.scores.items(), key=lambda item: -item[1])[:5]
        return {
            "tag": self.tag,
            "predicted": self.predicted,
            "confidence": round(self.confidence, 4),
            "threshold": self.threshold,
            "fallback_used": self.fallback_used,
            "scores": {tag: round(score, 4) for tag, score in top},
        }


def _clean_examples(examples: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Tags in sorted order, each with its distinct non-empty examples (first seen kept)."""
    cleaned: dict[str, list[str]] = {}
    for tag in sorted(examples):
        texts = [t.strip() for t in examples[tag] if isinstance(t, str) and t.strip()]
        unique = list(dict.fromkeys(texts))
        if unique:
            cleaned[tag] = unique
    return cleaned


def examples_fingerprint(examples: Mapping[str, Sequence[str]]) -> str:
    """A short stable hash of the examples (order of tags and duplicates do not matter).

    The gateway compares it with its classifier's to rebuild only when examples changed.
    """
    cleaned = _clean_examples(examples)
    canonical = {tag: sorted(texts) for tag, texts in cleaned.items()}
    payload = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()[:16]


class TagClassifier:
    """Nearest-centroid classification of prompts into capability tags (see the module).

    Building one embeds every example (about 4 ms each after the model is loaded); build
    it once per change of examples and share it: ``classify`` is thread-safe.
    """

    def __init__(
        self,
        examples: Mapping[str, Sequence[str]],
        *,
        threshold: float = DEFAULT_THRESHOLD,
        fallback_tag: str = GENERAL_TAG,
        temperature: float = TEMPERATURE,
        encoder: Encoder | None = None,
    ) -> None:
        """``examples`` maps each tag to its example prompts; tags without any are left out.

        ``encoder`` defaults to the process-wide MiniLM encoder (loaded now if needed).
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie between 0 and 1, got {threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        cleaned = _clean_examples(examples)
        self.threshold = threshold
        self.fallback_tag = fallback_tag
        self.temperature = temperature
        self.fingerprint = examples_fingerprint(cleaned)
        self.tags: tuple[str, ...] = tuple(cleaned)
        self.example_counts: dict[str, int] = {tag: len(texts) for tag, texts in cleaned.items()}
        self._encoder: Encoder | None = encoder
        self._centroids: FloatArray = np.zeros((0, 0), np.float32)
        if cleaned:
            encoder = self._get_encoder()
            texts = [text for tag in self.tags for text in cleaned[tag]]
            vectors = np.asarray(encoder.encode(texts), np.float32)
            centroids = []
            start = 0
            for tag in self.tags:
                end = start + len(cleaned[tag])
                mean = vectors[start:end].mean(axis=0)
                centroids.append(mean / np.maximum(np.linalg.norm(mean), 1e-12))
                start = end
            self._centroids = np.stack(centroids).astype(np.float32)

    def __repr__(self) -> str:
        return f"<TagClassifier {len(self.tags)} tags fingerprint={self.fingerprint}>"

    def _get_encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = get_encoder()
        return self._encoder

    def _fallback(
        self, scores: dict[str, float], predicted: str | None, confidence: float
    ) -> Classification:
        return Classification(
            tag=self.fallback_tag,
            confidence=confidence,
            scores=scores,
            fallback_used=True,
            predicted=predicted,
            threshold=self.threshold,
        )

    def classify(self, prompt: str) -> Classification:
        """Classify a prompt (the text of ``prompt_text(messages)``); blocking, ~5 ms.

        An empty prompt, or a classifier without tags, falls back with confidence 0.
        """
        text = _shorten(prompt)
        if not text or not self.tags:
            return self._fallback({}, None, 0.0)
        vector = np.asarray(self._get_encoder().encode([text]), np.float32)[0]
        similarities = self._centroids @ vector
        logits = similarities.astype(np.float64) / self.temperature
        weights = np.exp(logits - logits.max())
        probabilities = weights / weights.sum()
        best = int(probabilities.argmax())
        shares = probabilities.tolist()  # Python floats, for the trace's JSON
        confidence = shares[best]
        scores = dict(zip(self.tags, shares, strict=True))
        predicted = self.tags[best]
        if confidence < self.threshold or not math.isfinite(confidence):
            return self._fallback(scores, predicted, confidence)
        return Classification(
            tag=predicted,
            confidence=confidence,
            scores=scores,
            fallback_used=False,
            predicted=predicted,
            threshold=self.threshold,
        )

    async def classify_async(self, prompt: str) -> Classification:
        """``classify`` on a worker thread, so the event loop keeps serving meanwhile.

        The model is loaded when the classifier is built, not here.
        """
        return await asyncio.to_thread(self.classify, prompt)


# --- from the database ----------------------------------------------------------------------


@dataclass(slots=True)
class _Collected:
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, tag: str, texts: Any, *, limit: int | None = None) -> None:
        if not isinstance(texts, list):
            return
        clean = [t.strip()[:MAX_EXAMPLE_CHARS] for t in texts if isinstance(t, str) and t.strip()]
        if limit is not None:
            clean = clean[:limit]
        if clean:
            self.examples.setdefault(tag, []).extend(clean)


def tag_examples_from_db() -> dict[str, list[str]]:
    """``{tag: [example prompts]}``: platform examples plus vendors' declared ones (2 queries).

    A vendor's ``Endpoint.tag_examples`` count only when the endpoint is routable (approved,
    of an approved vendor), public (a private endpoint must not steer other customers'
    traffic), and only for tags the endpoint carries, at most
    ``MAX_VENDOR_EXAMPLES_PER_TAG`` per endpoint and tag, so no single vendor can flood a
    tag's centroid. Malformed values are skipped.
    """
    from vendors.models import CapabilityTag
    from vendors.selectors import routable_endpoints

    collected = _Collected()
    for slug, examples in CapabilityTag.objects.order_by("slug").values_list("slug", "examples"):
        collected.add(slug, examples)
    endpoints = routable_endpoints().filter(private_to__isnull=True).exclude(tag_examples={})
    for endpoint in endpoints:
        declared = endpoint.tag_examples
        if not isinstance(declared, dict):
            continue
        carried = {tag.slug for tag in endpoint.tags.all()}  # prefetched
        for tag in sorted(declared):
            if tag in carried:
                collected.add(tag, declared[tag], limit=MAX_VENDOR_EXAMPLES_PER_TAG)
    return collected.examples


def classifier_from_db(
    *,
    previous: TagClassifier | None = None,
    threshold: float | None = None,
    fallback_tag: str | None = None,
) -> TagClassifier:
    """A classifier over the examples in the database (blocking: call it off the loop).

    Returns ``previous`` itself when the examples' fingerprint and the settings are
    unchanged, so the gateway may call this on every routing-table change and re-embed
    only when examples changed. ``threshold`` and ``fallback_tag`` default to the settings
    ``AUTO_ROUTING_THRESHOLD`` and ``AUTO_ROUTING_FALLBACK_TAG`` when set, else 0.5 and
    ``general``.
    """
    from django.conf import settings

    if threshold is None:
        threshold = getattr(settings, "AUTO_ROUTING_THRESHOLD", DEFAULT_THRESHOLD)
    if fallback_tag is None:
        fallback_tag = str(getattr(settings, "AUTO_ROUTING_FALLBACK_TAG", GENERAL_TAG))
    examples = tag_examples_from_db()
    if (
        previous is not None
        and previous.fingerprint == examples_fingerprint(examples)
        and previous.threshold == threshold
        and previous.fallback_tag == fallback_tag
    ):
        return previous
    return TagClassifier(examples, threshold=threshold, fallback_tag=fallback_tag)

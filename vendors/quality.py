"""Quality of an endpoint per capability tag: golden sets, their scoring rules, the blend.

Three sources of evidence
-------------------------
* **probes**: the platform sends the golden items of ``vendors/golden/<tag>.json`` to the
  endpoint (temperature 0, few tokens). Evidence: ``probe_pass`` = the sum over items of
  each item's pass rate within ``PROBE_WINDOW`` and ``probe_n`` = the number of items
  that got an answer. Counting items, not runs: a deterministic prompt asked every hour
  is one piece of evidence, not 24.
* **feedback**: customers rate answers 0..1 (``POST /v1/feedback``); evidence is the sum
  and count of ratings within ``FEEDBACK_WINDOW``.
* **success**: the share of served requests that succeeded (usage ingest reports
  aggregated counts). Counters forget slowly: once ``total_n`` passes
  ``SUCCESS_MEMORY`` both counters are scaled down to it, keeping the ratio, so recent
  traffic keeps moving the mean.

The formula
-----------
For each source ``s`` with evidence sum ``x_s`` over ``n_s`` samples, the mean is shrunk
towards the prior ``PRIOR = 0.5`` with a pseudo-count ``K_s`` (a Beta-Bernoulli posterior
mean; ``K_s`` is how many samples it takes for the data to weigh as much as the prior)::

    m_s = (x_s + K_s * PRIOR) / (n_s + K_s)

The score is the weighted mean of the sources that have data (``n_s > 0``), the weights
``W_s`` renormalised over those sources; with no data at all it is the prior::

    score = sum(W_s * m_s) / sum(W_s)      over s with n_s > 0

=========  =====  =====  ==============================================================
source      K_s    W_s   why
=========  =====  =====  ==============================================================
probe         5    0.5   curated, comparable across vendors; a set is 5-10 items, so one
                         full pass moves a tag about two thirds of the way to its mean
feedback     10    0.3   real tasks but noisy and self-selected; ten ratings to count
                         as much as the prior
success      50    0.2   plentiful, but mostly measures availability and format, not
                         answer quality; it needs volume before it moves the score
=========  =====  =====  ==============================================================

The tag ``"*"`` is the overall score: every probe item, every rating and every observed
request of the endpoint. A score that moves by more than ``MATERIAL_CHANGE`` republishes
the routing snapshot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Final

from django.conf import settings

PRIOR: Final = 0.5
K_PROBE: Final = 5.0
K_FEEDBACK: Final = 10.0
K_SUCCESS: Final = 50.0
W_PROBE: Final = 0.5
W_FEEDBACK: Final = 0.3
W_SUCCESS: Final = 0.2
MATERIAL_CHANGE: Final = 0.02
OVERALL: Final = "*"
PROBE_WINDOW: Final = timedelta(days=7)
FEEDBACK_WINDOW: Final = timedelta(days=90)
SUCCESS_MEMORY: Final = 5_000

RULES: Final = ("exact", "contains", "regex", "any-of")
DEFAULT_PROBE_MAX_TOKENS: Final = 16
MAX_PROBE_MAX_TOKENS: Final = 128
DEFAULT_SYSTEM_PROMPT: Final = "Answer with only the answer, as briefly as possible."
_TAG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


# --------------------------------------------------------------------------- the blend


def shrunk_mean(total: float, n: float, k: float, prior: float = PRIOR) -> float:
    """The mean of ``n`` samples summing to ``total``, shrunk towards ``prior`` by ``k``."""
    return (total + k * prior) / (n + k)


@dataclass(frozen=True, slots=True)
class Evidence:
    probe_pass: float = 0.0
    probe_n: int = 0
    feedback_sum: float = 0.0
    feedback_n: int = 0
    success_n: int = 0
    total_n: int = 0


def blended_score(evidence: Evidence) -> float:
    """The quality score in [0, 1] for one endpoint and tag (see the module docstring)."""
    parts = (
        (W_PROBE, evidence.probe_pass, evidence.probe_n, K_PROBE),
        (W_FEEDBACK, evidence.feedback_sum, evidence.feedback_n, K_FEEDBACK),
        (W_SUCCESS, evidence.success_n, evidence.total_n, K_SUCCESS),
    )
    weighted = 0.0
    weights = 0.0
    for weight, total, n, k in parts:
        if n > 0:
            weighted += weight * shrunk_mean(float(total), float(n), k)
            weights += weight
    if weights == 0.0:
        return PRIOR
    return min(1.0, max(0.0, weighted / weights))


def decayed_counters(successes: int, total: int, memory: int = SUCCESS_MEMORY) -> tuple[int, int]:
    """Scale ``successes``/``total`` down to ``memory`` samples, keeping their ratio."""
    if total <= memory:
        return successes, total
    return round(successes * memory / total), memory


# --------------------------------------------------------------------------- golden sets


class GoldenSetError(ValueError):
    """A golden-set file that cannot be used; the message names the file and the item."""


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _strip_decoration(text: str) -> str:
    # Small models wrap one-word answers in quotes, backticks or a final full stop.
    return _normalise(text).strip(" \"'`*").rstrip(".!").strip(" \"'`*")


def answer_passes(rule: str, expected: tuple[str, ...], answer: str) -> bool:
    """Whether ``answer`` satisfies a scoring rule (every rule ignores case).

    * ``exact``: equal after collapsing whitespace and removing quotes, backticks and a
      final full stop;
    * ``contains``: the (normalised) expected text occurs in the answer;
    * ``any-of``: one of the expected texts occurs in the answer;
    * ``regex``: the pattern is found anywhere (``re.IGNORECASE | re.DOTALL``).
    """
    if rule == "exact":
        got = _strip_decoration(answer)
        return any(got == _strip_decoration(e) for e in expected)
    if rule in ("contains", "any-of"):
        got = _normalise(answer)
        return any(_normalise(e) in got for e in expected)
    if rule == "regex":
        return any(re.search(e, answer, re.IGNORECASE | re.DOTALL) for e in expected)
    raise GoldenSetError(f"unknown scoring rule {rule!r}; use one of {', '.join(RULES)}")


@dataclass(frozen=True, slots=True)
class GoldenItem:
    tag: str
    id: str
    prompt: str
    rule: str
    expected: tuple[str, ...]
    max_tokens: int = DEFAULT_PROBE_MAX_TOKENS
    system: str = DEFAULT_SYSTEM_PROMPT

    def passes(self, answer: str) -> bool:
        return answer_passes(self.rule, self.expected, answer)

    def messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": self.prompt}]


def golden_dir() -> Path:
    """Where the golden sets live (``settings.VENDORS_GOLDEN_DIR`` overrides the default)."""
    configured = getattr(settings, "VENDORS_GOLDEN_DIR", None)
    return Path(configured) if configured else Path(__file__).resolve().parent / "golden"


def golden_tags() -> list[str]:
    """The tags that have a golden set, sorted."""
    return sorted(p.stem for p in golden_dir().glob("*.json") if _TAG.match(p.stem))


def load_golden_set(tag: str) -> tuple[GoldenItem, ...]:
    """The items of ``tag``'s golden set; empty when the tag has none."""
    if not _TAG.match(tag):
        return ()
    path = golden_dir() / f"{tag}.json"
    if not path.is_file():
        return ()
    return _load(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _load(path: str, _mtime: int) -> tuple[GoldenItem, ...]:
    tag = Path(path).stem
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GoldenSetError(f"{path}: {exc}") from exc
    raw_items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(raw_items, list) or not raw_items:
        raise GoldenSetError(f"{path}: expected a non-empty list of items")
    items = [_parse_item(tag, path, raw) for raw in raw_items]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise GoldenSetError(f"{path}: item ids must be unique")
    return tuple(items)


def _parse_item(tag: str, path: str, raw: object) -> GoldenItem:
    if not isinstance(raw, dict):
        raise GoldenSetError(f"{path}: every item must be an object")
    item_id = raw.get("id")
    where = f"{path} item {item_id!r}"
    if not isinstance(item_id, str) or not item_id or len(item_id) > 64:
        raise GoldenSetError(f"{where}: 'id' must be a string of 1-64 characters")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GoldenSetError(f"{where}: 'prompt' must be a non-empty string")
    rule = raw.get("rule")
    if rule not in RULES:
        raise GoldenSetError(f"{where}: 'rule' must be one of {', '.join(RULES)}")
    expected_raw = raw.get("expected")
    expected = (expected_raw,) if isinstance(expected_raw, str) else expected_raw
    if (
        not isinstance(expected, list | tuple)
        or not expected
        or not all(isinstance(e, str) and e for e in expected)
    ):
        raise GoldenSetError(f"{where}: 'expected' must be a string or a list of strings")
    if rule == "regex":
        for pattern in expected:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise GoldenSetError(f"{where}: bad regex {pattern!r}: {exc}") from exc
    max_tokens = raw.get("max_tokens", DEFAULT_PROBE_MAX_TOKENS)
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_PROBE_MAX_TOKENS
    ):
        raise GoldenSetError(f"{where}: 'max_tokens' must be 1-{MAX_PROBE_MAX_TOKENS}")
    system = raw.get("system", DEFAULT_SYSTEM_PROMPT)
    if not isinstance(system, str):
        raise GoldenSetError(f"{where}: 'system' must be a string")
    return GoldenItem(
        tag=tag,
        id=item_id,
        prompt=prompt,
        rule=rule,
        expected=tuple(expected),
        max_tokens=max_tokens,
        system=system,
    )


def probe_tags(endpoint_tags: set[str] | frozenset[str]) -> list[str]:
    """The golden sets to send to a chat endpoint: ``general`` plus its tags that have one."""
    available = set(golden_tags())
    wanted = {"general", *endpoint_tags} & available
    return sorted(wanted)

"""Example prompts a vendor declares per capability tag (``Endpoint.tag_examples``).

Auto-routing (``routing/auto.py``) adds them to each tag's centroid once the endpoint is
approved and public. The limits and the rules live here, free of Django and numpy, so the
vendor portal's form, ``vendors.services.endpoint_create`` and the gateway's classifier
share them without importing one another (``vendors`` never imports ``routing``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final

#: At most this many examples per endpoint and tag (the classifier never takes more).
MAX_VENDOR_EXAMPLES_PER_TAG: Final = 20
#: At most this many characters per example (after stripping).
MAX_EXAMPLE_CHARS: Final = 500


class TagExamplesError(ValueError):
    """One declared example breaks a rule; ``position`` is its index among the entries."""

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(message)
        self.position = position


def tag_examples_clean(
    entries: Iterable[tuple[str, str]], *, tags: Collection[str]
) -> dict[str, list[str]]:
    """``{tag: [example, ...]}`` from ``(tag, example)`` entries, checked against ``tags``.

    Tags are compared lowercased and stripped; examples are stripped, kept in the order
    given and repeated ones dropped. Raises ``TagExamplesError`` at the first entry whose
    tag the endpoint does not carry, whose example is empty or longer than
    ``MAX_EXAMPLE_CHARS``, or that is one more than ``MAX_VENDOR_EXAMPLES_PER_TAG`` for its
    tag.
    """
    carried = {tag.strip().lower() for tag in tags}
    examples: dict[str, list[str]] = {}
    for position, (raw_tag, raw_text) in enumerate(entries):
        tag = raw_tag.strip().lower() if isinstance(raw_tag, str) else ""
        if tag not in carried:
            having = ", ".join(sorted(carried)) if carried else "none yet"
            raise TagExamplesError(
                f"{str(raw_tag).strip()!r} is not one of this endpoint's capability tags "
                f"({having})",
                position=position,
            )
        if not isinstance(raw_text, str):
            raise TagExamplesError("the example prompt must be text", position=position)
        text = raw_text.strip()
        if not text:
            raise TagExamplesError("the example prompt is empty", position=position)
        if len(text) > MAX_EXAMPLE_CHARS:
            raise TagExamplesError(
                f"the example prompt has {len(text)} characters; at most "
                f"{MAX_EXAMPLE_CHARS} are allowed",
                position=position,
            )
        kept = examples.setdefault(tag, [])
        if text in kept:
            continue
        if len(kept) >= MAX_VENDOR_EXAMPLES_PER_TAG:
            raise TagExamplesError(
                f"{tag!r} has more than {MAX_VENDOR_EXAMPLES_PER_TAG} example prompts; at most "
                f"{MAX_VENDOR_EXAMPLES_PER_TAG} per tag are allowed",
                position=position,
            )
        kept.append(text)
    return examples

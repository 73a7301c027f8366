"""Fill ``CapabilityTag.examples`` from ``vendors/examples/default_tags.json`` (auto-routing).

    python manage.py load_tag_examples [--file PATH] [--replace]

Idempotent: missing tags are created (with the file's name, kind and description), the
file's examples are added to each tag's existing ones (never duplicated, order kept), and
a second run changes nothing. ``--replace`` makes each listed tag's examples exactly the
file's (an operator's own examples of those tags are dropped). Tags not in the file are
left alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from vendors.models import CapabilityTag

DEFAULT_FILE: Final = Path(__file__).resolve().parents[2] / "examples" / "default_tags.json"


@dataclass
class LoadResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


class TagExamplesError(ValueError):
    """The examples file is malformed."""


def read_tag_examples(path: Path = DEFAULT_FILE) -> dict[str, dict[str, Any]]:
    """The ``tags`` object of an examples file, checked: ``{slug: {examples: [str], ...}}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TagExamplesError(f"cannot read {path}: {exc}") from exc
    tags = data.get("tags") if isinstance(data, dict) else None
    if not isinstance(tags, dict) or not tags:
        raise TagExamplesError(f"{path}: expected an object with a non-empty `tags` object")
    for slug, spec in tags.items():
        examples = spec.get("examples") if isinstance(spec, dict) else None
        if not isinstance(examples, list) or not all(
            isinstance(e, str) and e.strip() for e in examples
        ):
            raise TagExamplesError(f"{path}: `tags.{slug}.examples` must be a list of strings")
        kind = spec.get("kind", CapabilityTag.Kind.TASK)
        if kind not in CapabilityTag.Kind.values:
            raise TagExamplesError(
                f"{path}: `tags.{slug}.kind` must be one of {CapabilityTag.Kind.values}"
            )
    return tags


@transaction.atomic
def tag_examples_load(*, path: Path = DEFAULT_FILE, replace: bool = False) -> LoadResult:
    """Create missing tags and merge (or with ``replace``, set) their example prompts."""
    result = LoadResult()
    for slug, spec in sorted(read_tag_examples(path).items()):
        examples = [e.strip() for e in spec["examples"]]
        tag, created = CapabilityTag.objects.select_for_update().get_or_create(
            slug=slug,
            defaults={
                "name": spec.get("name") or slug,
                "kind": spec.get("kind", CapabilityTag.Kind.TASK),
                "description": spec.get("description", ""),
                "examples": list(dict.fromkeys(examples)),
            },
        )
        if created:
            result.created += 1
            continue
        current = tag.examples if isinstance(tag.examples, list) else []
        wanted = list(dict.fromkeys(examples if replace else [*current, *examples]))
        if wanted == current:
            result.unchanged += 1
            continue
        tag.examples = wanted
        tag.save(update_fields=["examples"])
        result.updated += 1
    return result


class Command(BaseCommand):
    help = "Create the default capability tags and fill their example prompts (auto-routing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
        parser.add_argument(
            "--replace",
            action="store_true",
            help="make each listed tag's examples exactly the file's (default: add missing)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            result = tag_examples_load(path=opts["file"], replace=opts["replace"])
        except TagExamplesError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"tags: {result.created} created, {result.updated} updated, "
            f"{result.unchanged} unchanged"
        )

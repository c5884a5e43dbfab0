"""``manage.py streaming_prune --older-than 7d``: delete old closed streams."""

from __future__ import annotations

import re
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from streaming_app.models import Stream

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` as a timedelta; raises ``CommandError``."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match is None:
        raise CommandError(f"Invalid duration {text!r}: use a number and s, m, h, d or w (7d).")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    help = "Delete closed streams (and their rows) closed longer ago than --older-than."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--older-than", required=True, help="e.g. 30m, 12h, 7d, 2w")
        parser.add_argument("--dry-run", action="store_true", help="Only say what would go.")

    def handle(self, *args: Any, **options: Any) -> None:
        cutoff = timezone.now() - parse_duration(options["older_than"])
        old = Stream.objects.filter(status=Stream.Status.CLOSED, closed_at__lt=cutoff)
        count = old.count()
        if options["dry_run"]:
            self.stdout.write(f"Would delete {count} closed stream(s).")
            return
        old.delete()
        self.stdout.write(f"Deleted {count} closed stream(s).")

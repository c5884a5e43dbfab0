"""``manage.py streaming_prune --older-than 7d [--conversations-older-than 90d]``: delete old
closed streams (with their transcripts); a stream that answered a turn of a conversation stays
as long as its conversation, which goes only with ``--conversations-older-than``."""

from __future__ import annotations

import re
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from streaming_app.models import Conversation, Stream

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` as a timedelta; raises ``CommandError``."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match is None:
        raise CommandError(f"Invalid duration {text!r}: use a number and s, m, h, d or w (7d).")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    help = (
        "Delete closed streams (with their transcripts) closed longer ago than --older-than; "
        "streams that answered a conversation's turn stay with their conversation, deleted "
        "only by --conversations-older-than (its last turn older than that)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--older-than", required=True, help="e.g. 30m, 12h, 7d, 2w")
        parser.add_argument("--conversations-older-than", metavar="DURATION",
                            help="also delete conversations whose last turn is older")  # fmt: skip
        parser.add_argument("--dry-run", action="store_true", help="Only say what would go.")

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        cutoff = now - parse_duration(options["older_than"])
        chats = Conversation.objects.none()
        if options["conversations_older_than"]:
            chat_cutoff = now - parse_duration(options["conversations_older_than"])
            chats = Conversation.objects.filter(created_at__lt=chat_cutoff).exclude(
                turns__created_at__gte=chat_cutoff
            )
        closed = Stream.objects.filter(status=Stream.Status.CLOSED)
        streams = closed.filter(closed_at__lt=cutoff, turn__isnull=True) | closed.filter(
            turn__conversation__in=chats.values("pk")
        )
        count, chat_count = streams.distinct().count(), chats.distinct().count()
        said = f"{count} closed stream(s)" + (
            f" and {chat_count} conversation(s)" if options["conversations_older_than"] else ""
        )
        if options["dry_run"]:
            self.stdout.write(f"Would delete {said}.")
            return
        with transaction.atomic():
            Stream.objects.filter(pk__in=list(streams.values_list("pk", flat=True))).delete()
            Conversation.objects.filter(pk__in=list(chats.values_list("pk", flat=True))).delete()
        self.stdout.write(f"Deleted {said}.")

"""``manage.py streaming_close <id>...``: close streams; every client sees the reason."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from streaming_app.manager import get_streaming_manager
from streaming_app.models import Stream


class Command(BaseCommand):
    help = "Close the given streams; their clients, in every process, see the reason."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("stream_ids", nargs="+", metavar="stream_id")
        parser.add_argument("--reason", default="Closed by an operator")

    def handle(self, *args: Any, **options: Any) -> None:
        ids: list[str] = options["stream_ids"]
        known = set(Stream.objects.filter(pk__in=ids).values_list("id", flat=True))
        missing = [i for i in ids if i not in known]
        if missing:  # refuse before closing anything: nothing half-done
            raise CommandError(f"No such stream: {', '.join(missing)}")
        manager = get_streaming_manager()
        for stream_id in ids:
            async_to_sync(manager.close_stream)(stream_id, options["reason"])
            self.stdout.write(f"Closed {stream_id}")

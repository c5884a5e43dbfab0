"""``manage.py streaming_list``: the active streams (``--all``: closed ones too)."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand
from django.db.models import Count
from django.utils import timezone

from streaming_app.manager import get_streaming_manager
from streaming_app.models import Stream

COLUMNS = ("id", "status", "owner", "clients", "chunks", "age", "idle", "close reason")


class Command(BaseCommand):
    help = "List streams: id, status, owner, clients, chunks, age, idle time, close reason."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--all", action="store_true", help="Include closed streams.")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        streams = Stream.objects.select_related("owner").annotate(clients_count=Count("clients"))
        if not options["all"]:
            streams = streams.filter(status=Stream.Status.ACTIVE)
        listed = list(streams.order_by("created_at"))
        # Chunks and last activity from the history: the rows lag while a stream is active.
        activity = async_to_sync(get_streaming_manager().get_stream_activity)(s.pk for s in listed)
        now = timezone.now()
        rows = [
            {
                "id": s.id,
                "status": s.status,
                "owner": s.owner.get_username() if s.owner else "",
                "clients": s.clients_count,
                "chunks": activity[s.pk].chunks_pushed,
                "age": round((now - s.created_at).total_seconds()),
                "idle": round((now - activity[s.pk].last_activity).total_seconds()),
                "close reason": s.close_reason,
                "metadata": s.metadata,
            }
            for s in listed
        ]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        if not rows:
            self.stdout.write("No streams." if options["all"] else "No active streams.")
            return
        table = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        for line in table:
            cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())

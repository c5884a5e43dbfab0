"""``manage.py streaming_close <id>...``: close streams; every client sees the reason."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from streaming_app.exceptions import GMIError
from streaming_app.management.base import reaching_manager
from streaming_app.models import Stream


class Command(BaseCommand):
    help = "Close the given streams; their clients, in every process, see the reason."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("stream_ids", nargs="+", metavar="stream_id")
        parser.add_argument("--reason", default="Closed by an operator")

    def handle(self, *args: Any, **options: Any) -> None:
        ids = list(dict.fromkeys(options["stream_ids"]))
        reason: str = options["reason"]
        if not reason.strip():
            raise CommandError("--reason must not be empty: every client is shown it.")
        status = dict(Stream.objects.filter(pk__in=ids).values_list("id", "status"))
        missing = [i for i in ids if i not in status]
        if missing:  # refuse before closing anything: nothing half-done
            raise CommandError(f"No such stream: {', '.join(missing)}")
        manager = reaching_manager("close streams")
        failed: list[str] = []
        for stream_id in ids:
            if status[stream_id] != Stream.Status.ACTIVE:
                self.stdout.write(f"{stream_id} was closed already")
                continue
            try:
                async_to_sync(manager.close_stream)(stream_id, reason)
            except GMIError as exc:  # e.g. the backend is down: try the others, then fail
                failed.append(stream_id)
                self.stderr.write(f"Could not close {stream_id}: {exc.message}")
                continue
            self.stdout.write(f"Closed {stream_id}")
        if failed:
            raise CommandError(f"{len(failed)} stream(s) not closed: {', '.join(failed)}")

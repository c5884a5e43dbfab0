"""``manage.py streaming_reap``: close idle streams and remove dead workers' clients (cron)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand

from streaming_app.management.base import reaching_manager


class Command(BaseCommand):
    help = (
        "Close streams idle past their inactivity timeout and remove clients whose worker "
        "stopped sending heartbeats."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only say what would be done.")

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = options["dry_run"]
        report = async_to_sync(reaching_manager("reap streams and clients").sweep)(dry_run=dry_run)
        verb = "Would close" if dry_run else "Closed"
        for stream_id in report.closed_idle:
            self.stdout.write(f"{verb} idle stream {stream_id}")
        verb = "Would finish" if dry_run else "Finished"
        for stream_id in report.finished_closes:
            self.stdout.write(f"{verb} the half-done close of stream {stream_id}")
        verb = "Would remove" if dry_run else "Removed"
        for stream_id, client_id in report.reaped_clients:
            self.stdout.write(f"{verb} client {client_id} of stream {stream_id} (dead worker)")
        self.stdout.write(
            f"{len(report.closed_idle)} idle stream(s), "
            f"{len(report.reaped_clients)} dead client(s)" + (" (dry run)" if dry_run else "")
        )

"""``manage.py streaming_shutdown``: close every active stream before a deploy.

Clients get a ``reconnect`` frame with their resume cursor and close code 4012, so they come
back for what they missed once the new workers run.
"""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from streaming_app.exceptions import GMIError
from streaming_app.management.base import reaching_manager
from streaming_app.manager import SHUTDOWN_REASON
from streaming_app.protocol import CloseCode


class Command(BaseCommand):
    help = "Close every active stream across the deployment; clients are told to reconnect."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--reason", default=SHUTDOWN_REASON)
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="Start no new close after this many seconds; streams left count as failures.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["timeout"] > 0:  # also refuses nan
            raise CommandError("--timeout must be a positive number of seconds.")
        if not options["reason"].strip():
            raise CommandError("--reason must not be empty: every client is shown it.")
        deadline = time.monotonic() + options["timeout"]
        manager = reaching_manager("shut streams down")
        ids = async_to_sync(manager.get_active_stream_ids)()
        failed: list[str] = []
        self.stdout.write(f"Closing {len(ids)} active stream(s)...")
        for index, stream_id in enumerate(ids, 1):
            if time.monotonic() > deadline:
                failed.extend(ids[index - 1 :])
                self.stderr.write(f"Timed out with {len(ids) - index + 1} stream(s) left.")
                break
            try:
                async_to_sync(manager.close_stream)(
                    stream_id, options["reason"], code=CloseCode.SERVICE_RESTART
                )
            except GMIError as exc:
                failed.append(stream_id)
                self.stderr.write(f"Could not close {stream_id}: {exc.message}")
                continue
            if index % 50 == 0 or index == len(ids):
                self.stdout.write(f"  {index}/{len(ids)} closed")
        if failed:
            raise CommandError(f"{len(failed)} stream(s) not closed: {', '.join(failed)}")
        self.stdout.write(self.style.SUCCESS(f"All {len(ids)} stream(s) closed."))

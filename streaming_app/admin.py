"""Operator pages over the registry. Actions go through the manager, never behind its back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin

from .models import Stream, StreamClient

if TYPE_CHECKING:
    _ClientInline = admin.TabularInline[StreamClient, Stream]
    _StreamAdmin = admin.ModelAdmin[Stream]
else:
    _ClientInline = admin.TabularInline
    _StreamAdmin = admin.ModelAdmin


class StreamClientInline(_ClientInline):
    model = StreamClient
    extra = 0
    can_delete = False
    fields = ("client_id", "transport", "user", "connected_at", "last_seen_at",
              "delivered_seq", "send_failures", "worker_id")  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(Stream)
class StreamAdmin(_StreamAdmin):
    list_display = ("id", "status", "owner", "created_at", "last_activity_at", "chunk_count")
    list_filter = ("status", "created_at")
    search_fields = ("id", "owner__username", "session_key", "metadata")
    readonly_fields = [f.name for f in Stream._meta.get_fields() if f.concrete]
    inlines = [StreamClientInline]

    def has_add_permission(self, request: object) -> bool:
        return False

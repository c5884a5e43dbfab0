"""Operator pages over the registry. Closing goes through the manager, never behind its back,
so every connected client (in every process) sees the reason."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .auth import CLOSE_PERMISSION, VIEW_CONTENTS_PERMISSION
from .exceptions import GMIError
from .manager import StreamActivity, get_streaming_manager
from .models import Conversation, Stream, StreamClient, StreamTranscript, Turn

if TYPE_CHECKING:
    _ClientInline = admin.TabularInline[StreamClient, Stream]
    _StreamAdmin = admin.ModelAdmin[Stream]
    _TurnInline = admin.TabularInline[Turn, Conversation]
    _ConversationAdmin = admin.ModelAdmin[Conversation]
else:
    _ClientInline = _TurnInline = admin.TabularInline
    _StreamAdmin = _ConversationAdmin = admin.ModelAdmin

RECENT_CHUNKS = 20
CONTENT_FIELDS = ("metadata", "reply", "recent_chunks")


class CloseForm(forms.Form):
    reason = forms.CharField(
        label=_("Reason"),
        max_length=500,
        initial=_("Closed by an operator"),
        help_text=_("Every connected client sees this."),
    )


def with_activity(streams: Sequence[Stream]) -> None:
    """Give each stream its current activity (``live(stream)``), from one history read."""
    activity = async_to_sync(get_streaming_manager().get_stream_activity)(s.pk for s in streams)
    for stream in streams:
        stream._live_activity = activity.get(stream.pk)  # type: ignore[attr-defined]


def live(stream: Stream) -> StreamActivity:
    """The stream's activity as :func:`with_activity` found it, else as its row has it."""
    found: StreamActivity | None = getattr(stream, "_live_activity", None)
    return found or StreamActivity(stream.chunk_count, stream.last_activity_at)


def head_seq(stream: Stream) -> int:
    """The stream's last seq: from the history when it holds the stream (always with Redis),
    else the count the sweeper last copied to the row."""
    states = async_to_sync(get_streaming_manager().history.states)([stream.pk])
    state = states.get(stream.pk)
    return max(state.head_seq, stream.chunk_count) if state is not None else stream.chunk_count


class AgeFilter(admin.SimpleListFilter):
    title = _("age")
    parameter_name = "age"
    BUCKETS = {
        "1h": (_("Less than an hour"), timedelta(hours=1)),
        "1d": (_("Less than a day"), timedelta(days=1)),
        "old": (_("A day or more"), None),
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(key, label) for key, (label, _span) in self.BUCKETS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Stream]) -> QuerySet[Stream]:
        now = timezone.now()
        if self.value() == "old":
            return queryset.filter(created_at__lte=now - timedelta(days=1))
        if self.value() in self.BUCKETS:
            span = self.BUCKETS[str(self.value())][1]
            assert span is not None
            return queryset.filter(created_at__gt=now - span)
        return queryset


class StreamClientInline(_ClientInline):
    model = StreamClient
    extra = 0
    can_delete = False
    fields = ("client_id", "transport", "user", "connected_at", "last_seen_at",
              "send_failures", "lag", "paused", "worker_id")  # fmt: skip
    readonly_fields = fields
    verbose_name_plural = _("connected clients")
    head_seq = 0  # set per request by StreamAdmin.get_inline_instances

    @admin.display(description=_("lag (chunks)"))
    def lag(self, client: StreamClient) -> str:
        """Chunks pushed that the client has not read, as of its worker's last sweep: the head
        minus its ack, or minus what was written to it when it does not ack (marked so)."""
        if client.acked_seq is not None:
            return str(max(0, self.head_seq - client.acked_seq))
        return _("%(lag)d (not acked: written)") % {
            "lag": max(0, self.head_seq - client.delivered_seq)
        }

    def get_queryset(self, request: HttpRequest) -> QuerySet[StreamClient]:
        return super().get_queryset(request).select_related("user")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Stream)
class StreamAdmin(_StreamAdmin):
    list_display = ("id", "status_cell", "owner", "created_at", "last_activity", "age",
                    "clients_connected", "chunks_pushed", "close_reason")  # fmt: skip
    list_filter = ("status", AgeFilter)
    search_fields = ("id", "owner__username", "metadata")
    readonly_fields = ("id", "status", "owner", "anonymous", "gmi_instance_id", "persona_id",
                       "metadata", "inactivity_timeout_ms", "created_at", "last_activity",
                       "closed_at", "close_reason", "chunks_pushed", "reply",
                       "recent_chunks")  # fmt: skip
    exclude = ("chunk_count", "last_activity_at")  # shown live (chunks_pushed, last_activity)
    inlines = [StreamClientInline]
    actions = ["close_streams"]

    class Media:
        js = ["streaming_app/admin-live.js"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Stream]:
        return super().get_queryset(request).annotate(clients_count=Count("clients"))

    @admin.display(description=_("status"), ordering="status")
    def status_cell(self, stream: Stream) -> str:
        return format_html(
            '<span data-stream="{}" data-field="status">{}</span>',
            stream.pk, stream.get_status_display(),
        )  # fmt: skip

    @admin.display(description=_("anonymous visitor"), boolean=True)
    def anonymous(self, stream: Stream) -> bool:
        """Whether an anonymous session created it (its session is never shown: only a keyed
        hash of it is stored, which is no use as a cookie)."""
        return bool(stream.session_hash) and stream.owner_id is None

    @admin.display(description=_("age"))
    def age(self, stream: Stream) -> str:
        return timesince(stream.created_at)

    @admin.display(description=_("clients connected"), ordering="clients_count")
    def clients_connected(self, stream: Stream) -> str:
        count = getattr(stream, "clients_count", 0)
        return format_html(
            '<span data-stream="{}" data-field="clients">{}</span>', stream.pk, count
        )

    @admin.display(description=_("chunks pushed"), ordering="chunk_count")
    def chunks_pushed(self, stream: Stream) -> str:
        chunks = live(stream).chunks_pushed
        return format_html('<span data-stream="{}" data-field="chunks">{}</span>', stream.pk,
                           chunks)  # fmt: skip

    @admin.display(description=_("last activity"), ordering="last_activity_at")
    def last_activity(self, stream: Stream) -> datetime:
        return live(stream).last_activity

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        """The page's rows, with their activity read from the history in one call (the rows'
        own counts lag behind while a stream is active)."""
        changelist = super().get_changelist_instance(request)
        with_activity(list(changelist.result_list))
        return changelist

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Stream | None:
        stream = super().get_object(request, object_id, from_field)
        if stream is not None:
            with_activity([stream])
        return stream

    @admin.display(description=_("transcript"))
    def reply(self, stream: Stream) -> str:
        """The reply as its reader saw it (saved at close): the text, then the tool calls."""
        saved = StreamTranscript.objects.filter(stream=stream).first()
        if saved is None:
            return str(_("Saved when the stream closes."))
        notes: list[str] = []
        if saved.history_lost:
            notes.append(str(_("The history was lost before the close: nothing to assemble.")))
        elif not saved.complete:
            notes.append(_("Assembled from seq %(first)d: the history no longer held the "
                           "chunks before it.") % {"first": saved.first_seq})  # fmt: skip
        calls = saved.data.get("tool_calls") or []
        rows = format_html_join(
            "", "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
            ((c.get("name"), json.dumps(c.get("arguments"))[:300],
              json.dumps(c.get("result"))[:300],
              _("failed: %s") % c.get("error_message") if c.get("is_success") is False
              else "") for c in calls),
        )  # fmt: skip
        table = format_html(
            "<table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th></th></tr></thead>"
            "<tbody>{}</tbody></table>", _("tool"), _("arguments"), _("result"), rows,
        ) if calls else ""  # fmt: skip
        return format_html(
            '{}<div style="white-space:pre-wrap;max-width:60em">{}</div>{}',
            format_html_join("", "<p><em>{}</em></p>", ((n,) for n in notes)), saved.text,
            table,
        )  # fmt: skip

    @admin.display(description=_("last chunks (from history)"))
    def recent_chunks(self, stream: Stream) -> str:
        history = get_streaming_manager().history
        head = head_seq(stream)
        replay = async_to_sync(history.read_after)(stream.pk, max(0, head - RECENT_CHUNKS))
        if not replay.entries:
            if head == 0:
                return str(_("No chunks were pushed."))
            return str(_("History holds no chunks of this stream in this process."))
        items = format_html_join(
            "", '<li value="{}"><code>{}</code></li>', ((s, t[:300]) for s, t in replay.entries)
        )
        return format_html("<details><summary>{}</summary><ol>{}</ol></details>",
                           _("%(count)d raw chunks") % {"count": len(replay.entries)},
                           items)  # fmt: skip

    def get_inline_instances(
        self, request: HttpRequest, obj: Stream | None = None
    ) -> list[admin.options.InlineModelAdmin[Any, Any]]:
        inlines = super().get_inline_instances(request, obj)
        if obj is not None:  # one history read per page, not one per client row
            head = head_seq(obj)
            for inline in inlines:
                if isinstance(inline, StreamClientInline):
                    inline.head_seq = head
        return inlines

    # -- permissions ----------------------------------------------------------------

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        """What the conversation said (its metadata and last chunks) needs "Can view stream
        contents": seeing the list of streams does not."""
        fields = tuple(super().get_readonly_fields(request, obj))
        if request.user.has_perm(VIEW_CONTENTS_PERMISSION):
            return fields
        return tuple(f for f in fields if f not in CONTENT_FIELDS)

    def get_exclude(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        exclude = tuple(super().get_exclude(request, obj) or ())
        if request.user.has_perm(VIEW_CONTENTS_PERMISSION):
            return exclude
        return (*exclude, *CONTENT_FIELDS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # close through the manager; old closed streams go with streaming_prune

    def has_close_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(CLOSE_PERMISSION)

    # -- closing --------------------------------------------------------------------

    @admin.action(description=_("Close selected streams"), permissions=["close"])
    def close_streams(
        self, request: HttpRequest, queryset: QuerySet[Stream]
    ) -> HttpResponse | None:
        form = CloseForm(request.POST if "reason" in request.POST else None)
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": _("Close streams"),
                "form": form,
                "streams": queryset,
                "action": "close_streams",
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(
                request, "admin/streaming_app/stream/close_confirmation.html", context
            )
        streams = list(queryset)
        active = [stream for stream in streams if stream.is_active]
        self._close(request, active, form.cleaned_data["reason"])
        if len(active) < len(streams):
            skipped = len(streams) - len(active)
            self.message_user(
                request,
                ngettext("%d stream was closed already.", "%d streams were closed already.",
                         skipped) % skipped,
                messages.INFO,
            )  # fmt: skip
        return None

    def close_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The change page's "Close stream" button: ask for a reason, then close."""
        if not self.has_close_permission(request):
            raise PermissionDenied
        stream = get_object_or_404(Stream, pk=unquote(object_id))  # admin URLs quote "_"
        change_url = reverse("admin:streaming_app_stream_change", args=[quote(stream.pk)])
        if not stream.is_active:
            self.message_user(request, _("This stream was closed already."), messages.INFO)
            return HttpResponseRedirect(change_url)
        form = CloseForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            self._close(request, [stream], form.cleaned_data["reason"])
            return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": _("Close stream"),
            "form": form,
            "streams": [stream],
            "cancel_url": change_url,
        }
        return TemplateResponse(
            request, "admin/streaming_app/stream/close_confirmation.html", context
        )

    def _close(self, request: HttpRequest, streams: list[Stream], reason: str) -> None:
        manager = get_streaming_manager()
        closed = 0
        for stream in streams:
            try:
                async_to_sync(manager.close_stream)(stream.pk, reason)
            except GMIError as exc:
                self.message_user(request, f"{stream.pk}: {exc.message}", messages.ERROR)
                continue
            closed += 1
        if closed:
            self.message_user(
                request,
                ngettext("Closed %d stream.", "Closed %d streams.", closed) % closed,
                messages.SUCCESS,
            )

    # -- live counts ----------------------------------------------------------------

    def live_view(self, request: HttpRequest) -> JsonResponse:
        """Active-stream counts for the changelist to refresh itself."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        ids = request.GET.getlist("id")
        rows = list(Stream.objects.filter(pk__in=ids).annotate(clients_count=Count("clients")))
        with_activity(rows)
        return JsonResponse({
            "active": Stream.objects.filter(status=Stream.Status.ACTIVE).count(),
            "streams": {s.pk: {"clients": s.clients_count, "chunks": live(s).chunks_pushed,
                               "status": s.get_status_display()} for s in rows},
        })  # fmt: skip

    def get_urls(self) -> list[URLPattern]:
        extra = [
            path("live/", self.admin_site.admin_view(self.live_view),
                 name="streaming_app_stream_live"),
            path("<path:object_id>/close/", self.admin_site.admin_view(self.close_view),
                 name="streaming_app_stream_close"),
        ]  # fmt: skip
        return extra + super().get_urls()

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        active = Stream.objects.filter(status=Stream.Status.ACTIVE).count()
        extra = {"active_count": active, "live_url": reverse("admin:streaming_app_stream_live")}
        return super().changelist_view(request, {**(extra_context or {}), **extra})

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {"can_close": self.has_close_permission(request)}
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), **extra})


class TurnInline(_TurnInline):
    model = Turn
    fields = ("index", "message", "stream", "reply")
    readonly_fields = fields
    extra = 0
    can_delete = False

    @admin.display(description=_("reply"))
    def reply(self, turn: Turn) -> str:
        transcript = StreamTranscript.objects.filter(stream_id=turn.stream_id).first()
        return transcript.text[:500] if transcript is not None else "…"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(_ConversationAdmin):
    """Conversations, searchable by owner and by what was said; what they say needs "Can view
    stream contents", as a stream's does."""

    list_display = ("title", "owner", "created_at", "turn_count")
    search_fields = ("id", "owner__username", "title", "turns__message")
    readonly_fields = ("id", "owner", "title", "created_at")
    exclude = ("session_hash",)
    inlines = [TurnInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        return super().get_queryset(request).annotate(turns_count=Count("turns"))

    @admin.display(description=_("turns"), ordering="turns_count")
    def turn_count(self, conversation: Conversation) -> int:
        return int(getattr(conversation, "turns_count", 0))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(VIEW_CONTENTS_PERMISSION))

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.has_perm(VIEW_CONTENTS_PERMISSION))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

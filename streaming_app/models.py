"""The stream registry: one ``Stream`` row per stream, one ``StreamClient`` row per subscriber.

Rows are written when streams and clients come and go, never per chunk; ``chunk_count`` and
``last_activity_at`` are copied from the history by the sweeper and at close.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

# Channels group names allow ASCII letters, digits, hyphens, underscores and periods.
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
validate_stream_id = RegexValidator(
    STREAM_ID_PATTERN,
    _("Stream ids are 1-64 ASCII letters, digits, hyphens, underscores or periods."),
)


class Stream(models.Model):
    """A stream of one agent response (or conversation) that clients subscribe to."""

    class Status(models.TextChoices):
        ACTIVE = "active", _("active")
        CLOSED = "closed", _("closed")

    id = models.CharField(_("id"), primary_key=True, max_length=64, validators=[validate_stream_id])
    status = models.CharField(
        _("status"), max_length=8, choices=Status.choices, default=Status.ACTIVE
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("owner"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="streams",
    )
    # A keyed hash (``auth.session_hash``) of the anonymous session that created the stream:
    # the session key itself is never stored, so the row cannot be used to take the session.
    session_hash = models.CharField(_("session hash"), max_length=64, blank=True, editable=False)
    gmi_instance_id = models.CharField(_("GMI instance id"), max_length=128, blank=True)
    persona_id = models.CharField(_("persona id"), max_length=128, blank=True)
    metadata = models.JSONField(_("metadata"), default=dict, blank=True)
    inactivity_timeout_ms = models.PositiveBigIntegerField(
        _("inactivity timeout (ms)"),
        null=True,
        blank=True,
        help_text=_("Empty: the configured default."),
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    last_activity_at = models.DateTimeField(_("last activity"), default=timezone.now)
    closed_at = models.DateTimeField(_("closed"), null=True, blank=True)
    close_reason = models.TextField(_("close reason"), blank=True)
    chunk_count = models.PositiveBigIntegerField(_("chunks pushed"), default=0)

    class Meta:
        verbose_name = _("stream")
        verbose_name_plural = _("streams")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "last_activity_at"], name="streaming_status_activity"),
            models.Index(fields=["status", "created_at"], name="streaming_status_created"),
            # The per-owner and per-session limits and start rates.
            models.Index(fields=["owner", "created_at"], name="streaming_owner_created"),
            models.Index(fields=["session_hash", "created_at"], name="streaming_session_created"),
        ]
        permissions = [
            ("close_stream", _("Can close streams")),
            ("view_stream_contents", _("Can view stream contents")),
            ("view_metrics", _("Can view streaming metrics")),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.get_status_display()})"

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


class StreamWorker(models.Model):
    """A process that serves clients; its heartbeat says it is alive (one row per worker)."""

    id = models.CharField(_("id"), primary_key=True, max_length=128)
    started_at = models.DateTimeField(_("started"), default=timezone.now)
    last_seen_at = models.DateTimeField(_("last heartbeat"), default=timezone.now)

    class Meta:
        verbose_name = _("stream worker")
        verbose_name_plural = _("stream workers")
        ordering = ["started_at"]
        indexes = [models.Index(fields=["last_seen_at"], name="streaming_worker_seen")]

    def __str__(self) -> str:
        return self.id


class StreamClient(models.Model):
    """A client subscribed to a stream, served by the process named in ``worker_id``."""

    class Transport(models.TextChoices):
        WEBSOCKET = "websocket", _("WebSocket")
        SSE = "sse", _("Server-Sent Events")
        AG_UI = "ag-ui", _("AG-UI (Server-Sent Events)")
        AI_SDK = "ai-sdk", _("AI SDK UI message stream")
        PYTHON = "python", _("Python object")

    # No index of its own: the unique (stream, client_id) constraint's index serves lookups by
    # stream, and every registration and removal would update a second one.
    stream = models.ForeignKey(
        Stream, verbose_name=_("stream"), on_delete=models.CASCADE, related_name="clients",
        db_index=False,
    )  # fmt: skip
    client_id = models.CharField(_("client id"), max_length=128)
    transport = models.CharField(
        _("transport"), max_length=16, choices=Transport.choices, default=Transport.PYTHON
    )
    channel_name = models.CharField(_("channel name"), max_length=200)
    worker_id = models.CharField(_("worker"), max_length=128)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("user"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="stream_subscriptions",
    )
    connected_at = models.DateTimeField(_("connected since"), default=timezone.now)
    last_seen_at = models.DateTimeField(_("last seen"), default=timezone.now)
    delivered_seq = models.PositiveBigIntegerField(
        _("written seq"), default=0, help_text=_("The last seq written to the client.")
    )
    acked_seq = models.PositiveBigIntegerField(
        _("acked seq"), null=True, blank=True,
        help_text=_("The last seq the client acknowledged reading; empty when it does not ack."),
    )  # fmt: skip
    paused = models.BooleanField(
        _("paused"), default=False,
        help_text=_("Flow control holds its chunks back until it acks what it was sent."),
    )  # fmt: skip
    send_failures = models.PositiveIntegerField(_("send failures"), default=0)

    class Meta:
        verbose_name = _("stream client")
        verbose_name_plural = _("stream clients")
        ordering = ["connected_at"]
        constraints = [
            models.UniqueConstraint(fields=["stream", "client_id"], name="streaming_unique_client")
        ]
        indexes = [
            models.Index(fields=["worker_id", "last_seen_at"], name="streaming_client_worker"),
        ]

    def __str__(self) -> str:
        return f"{self.client_id} on {self.stream_id}"


class ClusterLease(models.Model):
    """A lease on work that one worker does for the whole cluster (the sweeper's cluster
    part): held by ``holder`` until ``expires_at``, renewed by each of its passes."""

    name = models.CharField(_("name"), primary_key=True, max_length=64)
    holder = models.CharField(_("holder"), max_length=128)
    expires_at = models.DateTimeField(_("expires"))

    class Meta:
        verbose_name = _("cluster lease")
        verbose_name_plural = _("cluster leases")

    def __str__(self) -> str:
        return f"{self.name} ({self.holder})"


class StreamTranscript(models.Model):
    """What a closed stream said, assembled from its chunks (``transcripts.reduce``) and saved
    with the close, once."""

    stream = models.OneToOneField(
        Stream, verbose_name=_("stream"), primary_key=True, on_delete=models.CASCADE,
        related_name="transcript",
    )  # fmt: skip
    text = models.TextField(_("text"), blank=True)
    data = models.JSONField(
        _("data"), default=dict, blank=True,
        help_text=_("Tool calls, UI commands, progress, errors, metadata, usage."),
    )  # fmt: skip
    close_reason = models.TextField(_("close reason"), blank=True)
    first_seq = models.PositiveBigIntegerField(_("first seq"), default=0)
    last_seq = models.PositiveBigIntegerField(_("last seq"), default=0)
    complete = models.BooleanField(
        _("complete"), default=True, help_text=_("Every chunk from seq 1 was assembled.")
    )
    history_lost = models.BooleanField(_("history lost"), default=False)
    created_at = models.DateTimeField(_("saved"), default=timezone.now)

    class Meta:
        verbose_name = _("transcript")
        verbose_name_plural = _("transcripts")

    def __str__(self) -> str:
        return f"transcript of {self.stream_id}"


class Conversation(models.Model):
    """A chat a visitor keeps: its turns in order, each a message and the stream that answered
    it. Owned like a stream: a user, or (keyed hash) the anonymous session that started it."""

    id = models.CharField(_("id"), primary_key=True, max_length=64, validators=[validate_stream_id])
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("owner"), null=True, blank=True,
        on_delete=models.CASCADE, related_name="conversations",
    )  # fmt: skip
    session_hash = models.CharField(_("session hash"), max_length=64, blank=True, editable=False)
    title = models.CharField(_("title"), max_length=200, blank=True)
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    class Meta:
        verbose_name = _("conversation")
        verbose_name_plural = _("conversations")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "created_at"], name="streaming_conv_owner"),
            models.Index(fields=["session_hash", "created_at"], name="streaming_conv_session"),
        ]

    def __str__(self) -> str:
        return self.title or self.id


class Turn(models.Model):
    """One exchange of a conversation: the user's message and the stream of the reply."""

    conversation = models.ForeignKey(
        Conversation, verbose_name=_("conversation"), on_delete=models.CASCADE,
        related_name="turns",
    )  # fmt: skip
    index = models.PositiveIntegerField(_("index"))
    message = models.TextField(_("message"))
    stream = models.OneToOneField(
        Stream, verbose_name=_("stream"), null=True, blank=True, on_delete=models.SET_NULL,
        related_name="turn",
    )  # fmt: skip
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    class Meta:
        verbose_name = _("turn")
        verbose_name_plural = _("turns")
        ordering = ["conversation", "index"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "index"], name="streaming_turn_order")
        ]

    def __str__(self) -> str:
        return f"{self.conversation_id} #{self.index}"

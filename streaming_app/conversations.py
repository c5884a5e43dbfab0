"""Conversations a visitor keeps: turns in order, each a message and the stream answering it.

Owned like streams (a user, or the keyed hash of the anonymous session that started it; moved
to the user at login). A finished turn's reply is its stream's transcript; a turn in flight is
followed through its stream.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.db.models import Max

from .auth import is_owner, session_hash
from .models import Conversation, StreamTranscript, Turn
from .registry import database_sync_to_async

__all__ = ["conversation_for", "earlier_turns", "record_turn", "summary", "visitor_conversations"]


@database_sync_to_async
def conversation_for(
    user: Any, session_key: str | None, conversation_id: str | None, title: str
) -> Conversation | None:
    """The visitor's conversation ``conversation_id`` (None when it is not theirs or does not
    exist: the caller answers 404 for both), or a new one when no id is given."""
    authenticated = bool(getattr(user, "is_authenticated", False))
    if conversation_id:
        conversation = Conversation.objects.filter(pk=conversation_id[:64]).first()
        if conversation is None or not is_owner(user, session_key, conversation):
            return None
        return conversation
    return Conversation.objects.create(
        id=uuid.uuid4().hex, title=title[:200],
        owner=user if authenticated else None,
        session_hash="" if authenticated else session_hash(session_key),
    )  # fmt: skip


@database_sync_to_async
def earlier_turns(conversation: Conversation) -> list[tuple[str, str]]:
    """``(message, reply)`` of the turns so far, replies from the saved transcripts ("" for a
    turn whose reply is not finished)."""
    turns = conversation.turns.select_related("stream__transcript").order_by("index")
    out = []
    for turn in turns:
        transcript = getattr(turn.stream, "transcript", None) if turn.stream else None
        out.append((turn.message, transcript.text if transcript is not None else ""))
    return out


@database_sync_to_async
def record_turn(conversation: Conversation, message: str, stream_id: str) -> Turn:
    """Append a turn (its index is the next one, even when two are started at once)."""
    with transaction.atomic():
        Conversation.objects.select_for_update().filter(pk=conversation.pk).first()
        last = conversation.turns.aggregate(last=Max("index"))["last"]
        index = 0 if last is None else last + 1
        return Turn.objects.create(conversation=conversation, message=message,
                                   stream_id=stream_id, index=index)  # fmt: skip


@database_sync_to_async
def summary(conversation: Conversation) -> dict[str, Any]:
    """The conversation as the chat page restores it: every turn with its reply (finished, from
    the transcript) or its stream to follow (in flight)."""
    turns = []
    for turn in conversation.turns.select_related("stream").order_by("index"):
        stream = turn.stream
        transcript = StreamTranscript.objects.filter(stream=stream).first() if stream else None
        turns.append({
            "message": turn.message,
            "stream_id": stream.pk if stream else None,
            "active": bool(stream and stream.is_active),
            "reply": transcript.text if transcript is not None else None,
            "close_reason": stream.close_reason if stream else "",
        })  # fmt: skip
    return {"id": conversation.pk, "title": conversation.title,
            "created_at": conversation.created_at.isoformat(), "turns": turns}  # fmt: skip


@database_sync_to_async
def visitor_conversations(user: Any, session_key: str | None) -> list[dict[str, Any]]:
    """The visitor's conversations, newest first (for a sidebar)."""
    if getattr(user, "is_authenticated", False):
        rows = Conversation.objects.filter(owner=user)
    elif session_key:
        rows = Conversation.objects.filter(owner__isnull=True,
                                           session_hash=session_hash(session_key))  # fmt: skip
    else:
        return []
    return [{"id": c.pk, "title": c.title, "created_at": c.created_at.isoformat()}
            for c in rows.order_by("-created_at")[:100]]  # fmt: skip

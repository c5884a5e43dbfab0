"""The demo site: a live agent-chat page and the endpoint that starts an agent turn."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from streaming_app.agents import start_agent
from streaming_app.conversations import (
    conversation_for,
    earlier_turns,
    record_turn,
    summary,
    visitor_conversations,
)
from streaming_app.exceptions import GMIError
from streaming_app.manager import get_streaming_manager

MAX_MESSAGE_LENGTH = 4000


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (a lone surrogate from JSON's ``\\ud800`` is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def visitor_session(request: HttpRequest) -> str:
    """This visitor's session key, with a new session when there is none: no cookie, or a
    cookie whose session is gone (expired, deleted, made up)."""
    session = request.session
    await session.aitems()  # loads it: a cookie without a session leaves no key
    if session.session_key is None:
        await session.acreate()
    assert session.session_key is not None
    return session.session_key


@require_GET
async def chat(request: HttpRequest) -> HttpResponse:
    """The chat page; every visitor gets a session so anonymous streams have an owner."""
    await visitor_session(request)
    return render(request, "chat.html", {"stream_id": request.GET.get("stream", "")})


@require_GET
async def aisdk_chat(request: HttpRequest) -> HttpResponse:
    """The same chat read by a published client: the AI SDK's Chat over the UI message
    stream (``?stream=<id>`` follows a reply in flight)."""
    await visitor_session(request)
    return render(request, "aisdk.html", {"stream_id": request.GET.get("stream", "")})


@require_POST
async def start_turn(request: HttpRequest) -> JsonResponse:
    """Start an agent turn for the posted ``message``; the new stream's id and socket path."""
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message.strip():
        return JsonResponse({"error": "Send a JSON body with a non-empty 'message'."}, status=400)
    if "\x00" in message or not _encodable(message):
        return JsonResponse(
            {"error": "The message must be text: no NUL bytes or lone surrogates."}, status=400
        )
    if len(message) > MAX_MESSAGE_LENGTH:
        return JsonResponse(
            {"error": f"Messages are limited to {MAX_MESSAGE_LENGTH} characters."}, status=400
        )
    asked = body.get("conversation") if isinstance(body, dict) else None
    if asked is not None and not isinstance(asked, str):
        return JsonResponse({"error": "'conversation' must be a conversation id."}, status=400)
    session_key = await visitor_session(request)
    user = await request.auser()
    conversation = await conversation_for(user, session_key, asked, message)
    if conversation is None:  # not theirs, or no such id: the same answer
        return JsonResponse({"error": "No such conversation."}, status=404)
    history = await earlier_turns(conversation)
    try:
        stream_id = await get_streaming_manager().create_stream(
            owner=user if user.is_authenticated else None,
            session_key=session_key,
            metadata={"message": message[:200], "conversation": conversation.pk},
        )
    except GMIError as exc:
        response = JsonResponse(exc.to_dict(), status=exc.http_status)
        if "retry_after" in exc.details:
            response["Retry-After"] = str(exc.details["retry_after"])
        return response
    await record_turn(conversation, message, stream_id)
    start_agent(stream_id, message, history=history)
    return JsonResponse(
        {"stream_id": stream_id, "ws_path": f"/ws/streams/{stream_id}/",
         "conversation": conversation.pk},
        status=201,
    )  # fmt: skip


@require_GET
async def conversations(request: HttpRequest) -> JsonResponse:
    """The visitor's conversations, newest first."""
    user = await request.auser()
    return JsonResponse({"conversations": await visitor_conversations(
        user, request.session.session_key)})  # fmt: skip


@require_GET
async def conversation(request: HttpRequest, conversation_id: str) -> JsonResponse:
    """One of the visitor's conversations with every turn (404 for anyone else's)."""
    user = await request.auser()
    found = await conversation_for(user, request.session.session_key, conversation_id, "")
    if found is None:
        return JsonResponse({"error": "No such conversation."}, status=404)
    return JsonResponse(await summary(found))

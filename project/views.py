"""The demo site: a live agent-chat page and the endpoint that starts an agent turn."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from streaming_app.agents import start_agent
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


@require_GET
async def chat(request: HttpRequest) -> HttpResponse:
    """The chat page; every visitor gets a session so anonymous streams have an owner."""
    if request.session.session_key is None:
        await request.session.acreate()
    return render(request, "chat.html", {"stream_id": request.GET.get("stream", "")})


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
    if request.session.session_key is None:
        await request.session.acreate()
    user = await request.auser()
    try:
        stream_id = await get_streaming_manager().create_stream(
            owner=user if user.is_authenticated else None,
            session_key=request.session.session_key or "",
            metadata={"message": message[:200]},
        )
    except GMIError as exc:
        return JsonResponse(exc.to_dict(), status=exc.http_status)
    start_agent(stream_id, message)
    return JsonResponse(
        {"stream_id": stream_id, "ws_path": f"/ws/streams/{stream_id}/"}, status=201
    )

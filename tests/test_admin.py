"""The admin: the Streams changelist, the change page, closing with a reason and permissions."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from streaming_app.manager import get_streaming_manager
from streaming_app.models import Stream, StreamClient
from streaming_app.protocol import CloseCode
from streaming_app.routing import websocket_urlpatterns

from .conftest import RecordingClient, delta, eventually

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/streaming_app/stream/"


def staff(username: str, *perms: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in ("view_stream", *perms):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def superuser() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


async def test_changelist_shows_streams_with_live_counts() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("weather-1", metadata={"topic": "rain"})
    await manager.register_client(stream_id, RecordingClient("tab-1"))
    await manager.push_chunk(stream_id, delta(stream_id, "x"))
    await manager.sweep()  # records activity and chunk counts on the rows
    closed = await manager.create_stream("old-1")
    await manager.close_stream(closed, "finished")
    client = await sync_to_async(superuser)()
    page = (await sync_to_async(client.get)(CHANGELIST)).content.decode()
    for text in ("weather-1", "old-1", "finished", "clients connected", "chunks pushed", "age"):
        assert text in page.lower()
    assert '<strong data-field="active">1</strong> active stream' in page
    assert 'data-stream="weather-1" data-field="clients">1<' in page
    assert 'data-stream="weather-1" data-field="chunks">1<' in page
    search = (await sync_to_async(client.get)(CHANGELIST, {"q": "rain"})).content.decode()
    assert "weather-1" in search and "old-1" not in search
    closed_only = await sync_to_async(client.get)(CHANGELIST, {"status__exact": "closed"})
    assert "weather-1" not in closed_only.content.decode()
    live = await sync_to_async(client.get)(CHANGELIST + "live/", {"id": ["weather-1"]})
    assert live.json() == {
        "active": 1, "streams": {"weather-1": {"clients": 1, "chunks": 1, "status": "active"}},
    }  # fmt: skip


async def test_change_page_shows_clients_and_last_chunks() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    await manager.register_client(stream_id, RecordingClient("tab-1"))
    for i in range(25):
        await manager.push_chunk(stream_id, delta(stream_id, f"old-{i}"))
    for text in ("alpha", "beta"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    client = await sync_to_async(superuser)()
    page = (await sync_to_async(client.get)(f"{CHANGELIST}s-1/change/")).content.decode()
    assert "tab-1" in page and "python" in page.lower()
    assert "alpha" in page and "beta" in page
    assert 'id="close-stream-button"' in page
    assert "old-7" in page and "old-6" not in page  # the last 20 chunks only


async def test_close_action_asks_for_a_reason_and_clients_see_it() -> None:
    manager = get_streaming_manager()
    ids = [await manager.create_stream(f"s-{i}") for i in range(2)]
    watcher = RecordingClient("watcher")
    await manager.register_client(ids[0], watcher)
    client = await sync_to_async(superuser)()
    post = sync_to_async(client.post)
    form = {"action": "close_streams", "_selected_action": ids}
    confirm = await post(CHANGELIST, form)
    assert confirm.status_code == 200
    assert 'name="reason"' in confirm.content.decode()
    assert await Stream.objects.filter(status="active").acount() == 2  # nothing closed yet
    done = await post(CHANGELIST, {**form, "reason": "Model update"}, follow=True)
    assert "Closed 2 streams." in done.content.decode()
    await eventually(lambda: watcher.closed_reasons == ["Model update"])
    reasons = {s.close_reason async for s in Stream.objects.all()}
    assert reasons == {"Model update"}


async def test_close_button_asks_for_a_reason_then_closes() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    watcher = RecordingClient("watcher")
    await manager.register_client(stream_id, watcher)
    client = await sync_to_async(superuser)()
    url = f"{CHANGELIST}s-1/close/"
    assert 'name="reason"' in (await sync_to_async(client.get)(url)).content.decode()
    response = await sync_to_async(client.post)(url, {"reason": "Abuse"})
    assert response.status_code == 302
    await eventually(lambda: watcher.closed_reasons == ["Abuse"])
    assert (await Stream.objects.aget(pk="s-1")).close_reason == "Abuse"
    empty = await sync_to_async(client.post)(
        f"{CHANGELIST}{await manager.create_stream('s-2')}/close/", {"reason": ""}
    )
    assert "This field is required" in empty.content.decode()


async def test_closing_needs_its_own_permission() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    viewer = await sync_to_async(staff)("viewer")
    closer = await sync_to_async(staff)("closer", "close_stream")
    get, post = sync_to_async(viewer.get), sync_to_async(viewer.post)
    assert "close_streams" not in (await get(CHANGELIST)).content.decode()
    assert "close-stream-button" not in (await get(f"{CHANGELIST}s-1/change/")).content.decode()
    assert (await get(f"{CHANGELIST}s-1/close/")).status_code == 403
    assert (await post(f"{CHANGELIST}s-1/close/", {"reason": "x"})).status_code == 403
    form: dict[str, Any] = {"action": "close_streams", "_selected_action": [stream_id],
                            "reason": "x"}  # fmt: skip
    await post(CHANGELIST, form)
    assert (await Stream.objects.aget(pk="s-1")).status == "active"
    assert "close_streams" in (await sync_to_async(closer.get)(CHANGELIST)).content.decode()
    await sync_to_async(closer.post)(CHANGELIST, form)
    assert (await Stream.objects.aget(pk="s-1")).status == "closed"


async def test_streams_cannot_be_added_edited_or_deleted_in_the_admin() -> None:
    stream_id = await get_streaming_manager().create_stream("s-1")
    client = await sync_to_async(superuser)()
    assert (await sync_to_async(client.get)(CHANGELIST + "add/")).status_code == 403
    assert (await sync_to_async(client.get)(f"{CHANGELIST}{stream_id}/delete/")).status_code == 403
    assert "delete_selected" not in (await sync_to_async(client.get)(CHANGELIST)).content.decode()


async def test_age_filter_and_owner_search() -> None:
    manager = get_streaming_manager()
    owner = await User.objects.acreate_user("alice", password="pw")
    await manager.create_stream("new-1", owner=owner)
    await manager.create_stream("old-1")
    await Stream.objects.filter(pk="old-1").aupdate(created_at=timezone.now() - timedelta(days=2))
    client = await sync_to_async(superuser)()
    get = sync_to_async(client.get)

    async def listed(**query: str) -> set[str]:
        page = (await get(CHANGELIST, query)).content.decode()
        return {s for s in ("new-1", "old-1") if f'data-stream="{s}"' in page}

    assert await listed(age="1h") == {"new-1"}
    assert await listed(age="1d") == {"new-1"}
    assert await listed(age="old") == {"old-1"}
    assert await listed(q="alice") == {"new-1"}
    assert await listed(q="old-1") == {"old-1"}


async def test_change_page_shows_lag_and_says_when_history_lacks_the_chunks() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    await manager.register_client(stream_id, RecordingClient("tab-1"))
    for text in ("a", "b", "c"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    await StreamClient.objects.filter(client_id="tab-1").aupdate(delivered_seq=1)
    client = await sync_to_async(superuser)()
    url = f"{CHANGELIST}s-1/change/"
    page = (await sync_to_async(client.get)(url)).content.decode()
    assert re.search(r'class="field-lag">\s*<p>2 \(not acked: written\)</p>', page), (
        "3 pushed, 1 written to a client that does not ack: lag 2, marked"
    )
    await StreamClient.objects.filter(client_id="tab-1").aupdate(delivered_seq=3, acked_seq=1,
                                                                  paused=True)  # fmt: skip
    page = (await sync_to_async(client.get)(url)).content.decode()
    assert re.search(r'class="field-lag">\s*<p>2</p>', page), "3 pushed, 1 acked: lag 2"
    assert re.search(r'class="field-paused">\s*<p><img [^>]*alt="True"', page), page
    # Another process's memory history: the row knows chunks were pushed, history has none.
    await manager.sweep()
    await manager.history.forget(stream_id)
    page = (await sync_to_async(client.get)(url)).content.decode()
    assert "History holds no chunks of this stream in this process." in page
    fresh = await manager.create_stream("s-2")
    page = (await sync_to_async(client.get)(f"{CHANGELIST}{fresh}/change/")).content.decode()
    assert "No chunks were pushed." in page


async def test_admin_close_reaches_a_websocket_client() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    await manager.push_chunk(stream_id, delta(stream_id, "hello"))
    root = await User.objects.acreate_superuser("root", password="pw")
    communicator = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns), f"/ws/streams/{stream_id}/"
    )
    communicator.scope["user"] = root
    connected, _ = await communicator.connect()
    assert connected
    try:
        frames = [await communicator.receive_json_from() for _ in range(2)]
        assert [f["type"] for f in frames] == ["subscribed", "chunk"]
        client = Client()
        await sync_to_async(client.force_login)(root)
        await sync_to_async(client.post)(f"{CHANGELIST}s-1/close/", {"reason": "Abuse report"})
        assert await communicator.receive_json_from() == {
            "type": "closed", "reason": "Abuse report", "last_seq": 1,
        }  # fmt: skip
        output = await communicator.receive_output()
        assert output == {"type": "websocket.close", "code": CloseCode.STREAM_CLOSED}
    finally:
        await communicator.disconnect()


async def test_closing_closed_streams_says_so() -> None:
    manager = get_streaming_manager()
    for stream_id in ("open-1", "done-1"):
        await manager.create_stream(stream_id)
    await manager.close_stream("done-1", "finished")
    client = await sync_to_async(superuser)()
    post, get = sync_to_async(client.post), sync_to_async(client.get)
    form = {"action": "close_streams", "_selected_action": ["open-1", "done-1"], "reason": "x"}
    page = (await post(CHANGELIST, form, follow=True)).content.decode()
    assert "Closed 1 stream." in page and "1 stream was closed already." in page
    assert (await Stream.objects.aget(pk="done-1")).close_reason == "finished"
    change = (await get(f"{CHANGELIST}done-1/change/")).content.decode()
    assert "close-stream-button" not in change
    page = (await get(f"{CHANGELIST}done-1/close/", follow=True)).content.decode()
    assert "This stream was closed already." in page


async def test_live_counts_need_the_view_permission() -> None:
    await get_streaming_manager().create_stream("s-1")
    nobody = await sync_to_async(staff)("nobody")
    user = await User.objects.aget(username="nobody")
    await sync_to_async(user.user_permissions.clear)()
    live = await sync_to_async(nobody.get)(CHANGELIST + "live/", {"id": ["s-1"]})
    assert live.status_code == 403


async def test_counts_follow_the_history_head_between_sweeps() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("busy-1")
    for i in range(7):  # no sweep since: the row still says 0
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    assert (await Stream.objects.aget(pk=stream_id)).chunk_count == 0
    client = await sync_to_async(superuser)()
    page = (await sync_to_async(client.get)(CHANGELIST)).content.decode()
    assert 'data-stream="busy-1" data-field="chunks">7<' in page
    live = await sync_to_async(client.get)(CHANGELIST + "live/", {"id": ["busy-1"]})
    assert live.json()["streams"]["busy-1"]["chunks"] == 7
    change = (await sync_to_async(client.get)(f"{CHANGELIST}busy-1/change/")).content.decode()
    assert re.search(r"Chunks pushed:</label>\s*<div class=\"readonly\"><span[^>]*>7<", change)


async def test_the_close_button_works_for_ids_the_admin_quotes() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("a_b.c-1")  # "_" is quoted as "_5F" in admin URLs
    watcher = RecordingClient("watcher")
    await manager.register_client(stream_id, watcher)
    client = await sync_to_async(superuser)()
    change = (await sync_to_async(client.get)(f"{CHANGELIST}a_5Fb.c-1/change/")).content.decode()
    url = re.search(r'href="([^"]+)" id="close-stream-button"', change)
    assert url is not None
    assert 'name="reason"' in (await sync_to_async(client.get)(url.group(1))).content.decode()
    response = await sync_to_async(client.post)(url.group(1), {"reason": "Underscores"})
    assert response.status_code == 302
    await eventually(lambda: watcher.closed_reasons == ["Underscores"])


async def test_what_a_conversation_said_needs_its_own_permission() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("talk-1", metadata={"message": "my secret plan"})
    await manager.push_chunk(stream_id, delta(stream_id, "the private reply"))
    url = f"{CHANGELIST}talk-1/change/"
    viewer = await sync_to_async(staff)("viewer")
    page = (await sync_to_async(viewer.get)(url)).content.decode()
    assert "talk-1" in page
    assert "my secret plan" not in page and "the private reply" not in page
    reader = await sync_to_async(staff)("reader", "view_stream_contents")
    page = (await sync_to_async(reader.get)(url)).content.decode()
    assert "my secret plan" in page and "the private reply" in page


async def test_closing_returns_to_the_stream_it_closed_whatever_its_id() -> None:
    manager = get_streaming_manager()
    await manager.create_stream("job_1")  # what "job_5F1" reads as in an unquoted admin URL
    stream_id = await manager.create_stream("job_5F1")
    client = await sync_to_async(superuser)()
    response = await sync_to_async(client.post)(
        f"{CHANGELIST}job_5F5F1/close/", {"reason": "Done"}, follow=True
    )
    assert response.status_code == 200
    assert response.context["original"].pk == stream_id
    assert not (await Stream.objects.aget(pk=stream_id)).is_active
    assert (await Stream.objects.aget(pk="job_1")).is_active

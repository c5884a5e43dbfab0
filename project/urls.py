from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("aisdk/", views.aisdk_chat, name="aisdk-chat"),
    path("api/turns/", views.start_turn, name="start-turn"),
    path("api/conversations/", views.conversations, name="conversations"),
    path("api/conversations/<str:conversation_id>/", views.conversation, name="conversation"),
    path("admin/", admin.site.urls),
    path("", include("streaming_app.urls")),
]

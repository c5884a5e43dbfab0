"""Streams keep a keyed hash of the anonymous session that created them, not its key."""

from django.conf import settings
from django.db import migrations, models
from django.utils.crypto import salted_hmac

BATCH = 1000


def session_hash(session_key):  # type: ignore[no-untyped-def]
    """``streaming_app.auth.session_hash`` as of this migration."""
    return salted_hmac(
        "streaming_app.Stream.session_hash", session_key, algorithm="sha256"
    ).hexdigest()


def hash_session_keys(apps, schema_editor):  # type: ignore[no-untyped-def]
    Stream = apps.get_model("streaming_app", "Stream")
    rows = Stream.objects.exclude(session_hash="").values_list("pk", "session_hash")
    for pk, key in rows.iterator(chunk_size=BATCH):
        Stream.objects.filter(pk=pk).update(session_hash=session_hash(key))


class Migration(migrations.Migration):
    dependencies = [
        ("streaming_app", "0003_view_stream_contents"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RenameField(model_name="stream", old_name="session_key", new_name="session_hash"),
        migrations.AlterField(
            model_name="stream",
            name="session_hash",
            field=models.CharField(
                blank=True, editable=False, max_length=64, verbose_name="session hash"
            ),
        ),
        # Hash the keys stored so far: their visitors keep their streams, and the keys go.
        migrations.RunPython(hash_session_keys, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name="stream",
            index=models.Index(fields=["owner", "created_at"], name="streaming_owner_created"),
        ),
        migrations.AddIndex(
            model_name="stream",
            index=models.Index(
                fields=["session_hash", "created_at"], name="streaming_session_created"
            ),
        ),
    ]

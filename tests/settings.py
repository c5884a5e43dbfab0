"""The test run's settings: the demo's, with a secret key of this run's own.

The demo refuses to start with ``DEBUG`` off and no ``DJANGO_SECRET_KEY``; the key set here
is inherited by every process a test starts (``servers.base_env`` copies this environment).
"""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("DJANGO_SECRET_KEY", f"tests-{secrets.token_urlsafe(50)}")

from project.settings import *  # noqa: F403

"""ASGI entry point: HTTP to Django, WebSocket to messaging.routing (served by daphne)."""

from __future__ import annotations

import os
from typing import Any, cast

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pegasus_site.settings")
django_asgi_app = get_asgi_application()

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

# Plain daphne serves no static files: the console's CSS and JS come from here (any DEBUG).
django_asgi_app = cast(Any, ASGIStaticFilesHandler(django_asgi_app))  # an ASGI app, typed loosely

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from console import rates as console_rates  # noqa: E402
from messaging import listener, longpoll, maintenance, routing  # noqa: E402
from messaging.bridges import runner as bridge_runner  # noqa: E402
from pegasus_site.bodylimit import BodyLimit, guard_daphne  # noqa: E402
from pegasus_site.express import ExpressLane  # noqa: E402
from pegasus_site.gc_tuning import settle_garbage_collector  # noqa: E402
from pegasus_site.longpoll_handler import LongPollRouter  # noqa: E402

maintenance.start_in_background()
bridge_runner.start_in_background()  # forwards bridges (docs/bridges.md); PEGASUS_BRIDGES_RUNNER=off opts out
console_rates.start_in_background()  # flushes publish/deliver/ack counters for the console
listener.ensure_started()  # cross-process wake-ups (PostgreSQL only)
guard_daphne()  # 413 for oversized request bodies while they arrive, not after
longpoll.unpin_request_threads()  # a waiting long poll holds no thread

settle_garbage_collector()  # last: after every module and background thread above is loaded

application = ProtocolTypeRouter(
    {
        # The hot REST operations skip Django's handler (pegasus_site/express.py).
        "http": BodyLimit(ExpressLane(LongPollRouter(django_asgi_app))),
        "websocket": routing.origin_checked(URLRouter(routing.websocket_urlpatterns)),
    }
)

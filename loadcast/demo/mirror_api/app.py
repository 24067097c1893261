"""The demo API as an edge mirror: the same queueing backend, 4 workers (40 requests/s)."""

import os

from loadcast.demo.backends import serve_one

serve_one(int(os.environ["PORT"]), os.environ.get("LOADCAST_INSTANCE", "orders-mirror"),
          slots=4, service_ms=100.0)

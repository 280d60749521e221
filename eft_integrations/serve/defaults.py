"""The server's defaults, in one place so the app, the server, the config and the command
line share them."""

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_LIMIT_CONCURRENCY",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_SHUTDOWN_GRACE",
]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted (413 beyond)."""
DEFAULT_BODY_TIMEOUT = 60.0
"""Seconds a request's body may take to arrive after its headers (408 beyond)."""
DEFAULT_KEEP_ALIVE = 5.0
"""Seconds an idle connection is kept open between requests (uvicorn's default)."""
DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send its request headers (then 408 and closed)."""
DEFAULT_LIMIT_CONCURRENCY = 1024
"""Most connections and tasks at once; uvicorn answers 503 beyond."""
DEFAULT_SHUTDOWN_GRACE = 30.0
"""Seconds running requests get to finish on SIGTERM before they are cut short."""

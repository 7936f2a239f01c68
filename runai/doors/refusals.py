# -*- test-case-name: runai.test.test_metrics_refusals -*-
"""What a door refuses by itself, before a request reaches a route or the core, named for
``--metrics``.

An HTTP site answers some requests from their headers, their size or their pace, and caps
its connections; the socket door caps its connections. The core never hears of these. A
door that does (a site, a factory) has an ``on_refused`` attribute: ``None`` (nothing is
counted, the default), or a callable that ``--metrics`` sets and that :func:`tell` calls
with the refusal's code, once per refusal.

The code is runai's error code where the answer carries one that names the condition
(``unauthorized``, ``message_too_large`` for a body, ``idle_timeout``); else one of
:data:`CODES`, for conditions that only a transport has. Imports nothing.
"""

URI_TOO_LONG = "uri_too_long"  # HTTP 414: a request line over its limit
HEADERS_TOO_LARGE = "headers_too_large"  # HTTP 431: headers over their size or count
TOO_MANY_BODIES = "too_many_bodies"  # HTTP 503: the bodies being received at once are over their budget
TOO_MANY_CONNECTIONS = "too_many_connections"  # a connection over the door's cap (HTTP 503; the socket door closes it)
CODES = frozenset((URI_TOO_LONG, HEADERS_TOO_LARGE, TOO_MANY_BODIES, TOO_MANY_CONNECTIONS))

# HTTP statuses whose answers carry a runai code that says less than the status does:
# message_too_large (a body's) for 414 and 431, queue_full (the jobs') for 503.
_BY_STATUS = {414: URI_TOO_LONG, 431: HEADERS_TOO_LARGE, 503: TOO_MANY_BODIES}


def http_code(status, error):
    """The code of an HTTP site's early answer ``status`` carrying ``error`` (a RunaiError)."""
    return _BY_STATUS.get(status, error.code)


def tell(door, code):
    """Tell ``door``'s ``on_refused``, where set, of a refusal ``code``."""
    hook = getattr(door, "on_refused", None)
    if hook is not None:
        hook(code)

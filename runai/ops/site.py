# -*- test-case-name: runai.test.test_metrics -*-
"""The ``--metrics`` site: ``GET /metrics`` (Prometheus text, or OpenMetrics when asked
for) and ``GET /health`` (200 ``{"status": "ok", "workers": N}`` while workers serve, 503
``{"status": "unavailable", "reason": ...}`` when none can; with local workers, ``"failing"``
counts the live ones whose last jobs all failed, :mod:`runai.ops.health`).

The scrape is rendered on the reactor thread, not in a thread pool as
``prometheus_client.twisted.MetricsResource`` would: the gauges read the queue and the
workers, which live on the reactor thread, and rendering a few dozen samples takes well
under a millisecond. It is the HTTP door's :class:`runai.doors.http.site.Site`, so the same
bounds hold (connections, times, bodies) and, unless ``--metrics-public``, the same token:
``Authorization: Bearer TOKEN`` or HTTP Basic with the token as the password, checked in
constant time from the headers, 401 without it.
"""

import json

from prometheus_client import exposition
from twisted.web import resource

from runai.doors.http.site import Site

# Nothing here takes a body: a request may bring at most this much.
MAX_BODY = 4096


class MetricsPage(resource.Resource):
    """``registry``'s samples, in the format the scraper's ``Accept`` header asks for."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = exposition.choose_encoder(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self.registry)


class HealthPage(resource.Resource):
    """``check()`` (a :class:`runai.ops.health.Health`) as JSON: 200 when some worker can
    take jobs, 503 with the reason when none can."""

    isLeaf = True

    def __init__(self, check):
        super().__init__()
        self.check = check

    def render_GET(self, request):
        health = self.check()
        request.setResponseCode(200 if health.ok else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(health.body()).encode("utf-8")


def make_site(metrics, check, token=None, reactor=None, timeout=60):
    """The site of ``metrics`` (a :class:`runai.ops.metrics.Metrics`) and ``check``;
    ``token`` (None: open) guards both pages."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    root.putChild(b"health", HealthPage(check))
    return Site(root, MAX_BODY, timeout=timeout, token=token, reactor=reactor, early=True)

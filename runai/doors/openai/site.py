# -*- test-case-name: runai.test.test_openai_site,runai.test.test_openai -*-
"""The OpenAI door's twisted.web site: the HTTP door's hardened
:class:`runai.doors.http.site.Site`, with OpenAI's error body (``{"error": {"message",
"type", "param", "code"}}``) and OpenAI's token check: ``Authorization: Bearer TOKEN``,
what OpenAI's clients send as their API key.

So the same bounds hold as on ``--http``: a request without the token is answered 401
from its headers, before any of its body is read; bodies are held in memory (twisted.web
would spill a large one into a temporary file, and parse a form itself: runai parses
forms in :mod:`runai.doors.openai.multipart`), and one over ``--max-message-size`` is
answered 413 as soon as its length is known; 414 for a long URL, 431 for large headers,
408 for a request that trickles in, 503 past the cap on connections.
:class:`~runai.doors.openai.api.Api` is at ``/v1``."""

import hmac

from twisted.web import resource

from runai.core import errors
from runai.doors.http import site
from runai.doors.openai.replies import error_body

AUTHENTICATE = ("WWW-Authenticate", 'Bearer realm="runai"')


def authorized(request, token):
    """True when no token is needed, or the request carries it as a Bearer token.
    Constant-time."""
    if token is None:
        return True
    # The raw bytes: a header that is not UTF-8 is a wrong token (401), never an error.
    raw = (request.requestHeaders.getRawHeaders(b"authorization") or [b""])[0]
    scheme, _, value = raw.strip().partition(b" ")
    given = value.strip() if scheme.lower() == b"bearer" else b""
    return hmac.compare_digest(given, token if isinstance(token, bytes) else token.encode("utf-8"))


def unauthorized_error():
    return errors.RunaiError(errors.UNAUTHORIZED, "this server needs its token as the API key: "
                                                  "Authorization: Bearer TOKEN")


def unauthorized(request):
    """Mark ``request`` 401 (with ``WWW-Authenticate: Bearer``) and return its RunaiError."""
    request.setHeader(AUTHENTICATE[0], AUTHENTICATE[1])
    return unauthorized_error()


class Site(site.Site):
    """The HTTP door's site, answering early in OpenAI's shapes; ``token`` (str, bytes or
    None) is the shared secret, taken as a Bearer token only."""

    def __init__(self, root, max_body, timeout=60, token=None, reactor=None):
        super().__init__(root, max_body, timeout=timeout, token=token, reactor=reactor, early=True,
                         error_body=error_body)

    def refusal(self, request, length):
        if not authorized(request, self.token):
            return 401, unauthorized_error(), (AUTHENTICATE,)
        return super().refusal(request, length)


def make_site(api, max_body, timeout=60, reactor=None):
    """The site: ``api`` (a :class:`runai.doors.openai.api.Api`) at ``/v1``."""
    root = resource.Resource()
    root.putChild(b"v1", api)
    return Site(root, max_body, timeout=timeout, token=api.token, reactor=reactor)

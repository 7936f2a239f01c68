# -*- test-case-name: runai.test.test_openai -*-
"""The OpenAI door's twisted.web site: request bodies held in memory and bounded
(twisted.web would spill a large one into a temporary file, and parse a form itself:
runai writes nothing to disk, and parses forms in :mod:`runai.doors.openai.multipart`),
:class:`~runai.doors.openai.api.Api` at ``/v1``, and the token check: ``Authorization:
Bearer TOKEN``, what OpenAI's clients send as their API key."""

import hmac
import io

from twisted.web import resource, server

from runai.core import errors


class LimitedRequest(server.Request):
    """A request whose body is read into memory up to the site's ``max_body`` bytes; past
    that the rest is read and dropped, and the request is answered 413. The token is
    checked once the headers are in: a request without it has its body dropped as it
    arrives, never held, and is answered 401."""

    def gotLength(self, length):
        site = self.channel.site
        self.body_limit = site.max_body
        self.body_size = 0
        self.content = io.BytesIO()  # never a temporary file on disk
        self.too_large = length is not None and length > self.body_limit
        self.drop_body = not authorized(self, site.token)

    def handleContentChunk(self, data):
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self.too_large = True
        if self.too_large or self.drop_body:
            if self.content.tell():
                self.content = io.BytesIO()
            return
        self.content.write(data)


class Site(server.Site):
    requestFactory = LimitedRequest
    noisy = False

    def __init__(self, root, max_body, timeout=60, token=None):
        # No form parsing by twisted.web: the routes parse their own, bounded.
        super().__init__(root, parsePOSTFormSubmission=False, timeout=timeout)
        self.max_body = max_body
        self.token = token


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


def unauthorized(request):
    request.setHeader("www-authenticate", 'Bearer realm="runai"')
    return errors.RunaiError(errors.UNAUTHORIZED, "this server needs its token as the API key: "
                                                  "Authorization: Bearer TOKEN")


def make_site(api, max_body, timeout=60):
    """The site: ``api`` (a :class:`runai.doors.openai.api.Api`) at ``/v1``; a connection
    idle for ``timeout`` seconds between requests is closed."""
    root = resource.Resource()
    root.putChild(b"v1", api)
    return Site(root, max_body, timeout=timeout, token=api.token)

# -*- test-case-name: runai.test.test_http -*-
"""The HTTP door's twisted.web site: request bodies held in memory and bounded (twisted.web
would spill a large one into a temporary file: runai writes nothing to disk), and the
shared secret checked before anything else."""

import base64
import binascii
import hmac
import io

from twisted.web import resource, server

from runai.core import errors


class LimitedRequest(server.Request):
    """A request whose body is read into memory up to the site's ``max_body`` bytes; past
    that the rest is read and dropped, and the request is answered 413."""

    def gotLength(self, length):
        self.body_limit = self.channel.site.max_body
        self.body_size = 0
        self.content = io.BytesIO()  # never a temporary file on disk
        self.too_large = length is not None and length > self.body_limit

    def handleContentChunk(self, data):
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self.too_large = True
        if self.too_large:
            if self.content.tell():
                self.content = io.BytesIO()
            return
        self.content.write(data)


class Site(server.Site):
    requestFactory = LimitedRequest
    noisy = False

    def __init__(self, root, max_body, timeout=60):
        super().__init__(root, parsePOSTFormSubmission=False, timeout=timeout)
        self.max_body = max_body


def authorized(request, token):
    """True when no token is needed, or the request carries it: ``Authorization: Bearer
    TOKEN``, or HTTP Basic with the token as the password (what AUTOMATIC1111's
    ``--api-auth`` clients send). Constant-time."""
    if token is None:
        return True
    header = request.getHeader("authorization") or ""
    scheme, _, value = header.strip().partition(" ")
    given = b""
    if scheme.lower() == "bearer":
        given = value.strip().encode("utf-8", "surrogatepass")
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        given = decoded.partition(b":")[2]
    return hmac.compare_digest(given, token)


def unauthorized(request):
    request.setResponseCode(401)
    request.setHeader("www-authenticate", 'Basic realm="runai"')
    return errors.RunaiError(errors.UNAUTHORIZED, "this server needs its token: Authorization: Bearer TOKEN, "
                                                  "or HTTP Basic with the token as the password")


def make_site(api, max_body):
    """The site: ``api`` (a :class:`runai.doors.http.api.Api`) at ``/sdapi/v1``."""
    root = resource.Resource()
    sdapi = resource.Resource()
    root.putChild(b"sdapi", sdapi)
    sdapi.putChild(b"v1", api)
    return Site(root, max_body)
